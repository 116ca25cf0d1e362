//! The `rbd` volume driver through the `volback` CLI, against the two test
//! Ceph clusters of fixtures/test.sh (`VOLBACK_TEST_CEPH_A` / `_B`: these
//! tests fail, never skip, without them). Every image a test makes, or
//! volback makes for it, is removed by an [`RbdImage`] guard.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use volback_tests::*;

/// An installation over `yaml` (a configuration written as `volback.yaml`
/// in the scratch directory, with a file pool directory `backup/vault`).
fn installation(s: &Scratch, yaml: &str) -> Installation {
    std::fs::create_dir_all(s.join("backup/vault")).unwrap();
    let config = s.join("volback.yaml");
    std::fs::write(&config, yaml).unwrap();
    Installation {
        dir: s.path().to_path_buf(),
        config,
    }
}

fn conf_arg(conf: &Path) -> String {
    arg(conf)
}

/// Guards for the image of volume `id` in Ceph pool `ceph_pool`.
fn guard(conf: &Path, ceph_pool: &str, id: &str) -> RbdImage {
    RbdImage::adopt(conf, ceph_pool, &format!("volume-{id}"))
}

fn backup(inst: &Installation, volume: &str, extra: &[&str]) -> Value {
    let mut args = vec!["backup", "create", volume];
    args.extend_from_slice(extra);
    args.push("--json");
    let b = inst.json(args);
    assert_eq!(json_str(&b, "state"), "available", "{b}");
    b
}

/// Restores backup `b` to a new volume on `to`; returns the new volume id.
fn restore(inst: &Installation, b: &Value, to: &str) -> String {
    let r = inst.json([
        "restore",
        json_str(b, "id"),
        "--to",
        to,
        "--verify",
        "--json",
    ]);
    json_str(&r, "volume").to_owned()
}

fn assert_same_bytes(what: &str, expected: &[u8], actual: &[u8]) {
    assert_eq!(expected.len(), actual.len(), "{what}: sizes differ");
    if let Some(i) = (0..expected.len()).find(|&i| expected[i] != actual[i]) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// Writes some data islands and leaves holes.
fn write_first(img: &RbdImage) {
    img.write(0, &random_bytes(MIB as usize, 1));
    img.write(5 * MIB + 4 * KIB, &random_bytes(300_000, 2));
    img.write(15 * MIB, &random_bytes(MIB as usize, 3));
}

/// Changes some of it: an overwrite, a new island, a discard.
fn write_second(img: &RbdImage) {
    img.write(100 * KIB, &random_bytes(64 * KIB as usize, 4));
    img.write(9 * MIB, &random_bytes(200_000, 5));
    img.discard(15 * MIB, 512 * KIB);
}

const SIZE: u64 = 16 * MIB;

/// Backend `ceph` (pool `ceph:vol`, Ceph pool `volumes` of the cluster of
/// `conf`) backed up to the file pool `backup:vault`.
fn rbd_and_vault(s: &Scratch, conf: &Path) -> Installation {
    installation(
        s,
        &format!(
            "backends:
  - name: ceph
    driver: rbd
    options: {{conf: {}}}
    pools: {{vol: volumes}}
  - name: backup
    driver: file
    pools: {{vault: backup/vault}}
backup:
  default_target: backup:vault
  catalog: catalog.db
",
            conf_arg(conf)
        ),
    )
}

// 1. rbd -> file pool -> rbd ---------------------------------------------------

#[test]
fn rbd_volume_backup_to_file_pool_and_restore_to_rbd() {
    let a = ceph_conf('A');
    with_scratch(|s| {
        let inst = rbd_and_vault(s, &a);
        inst.ok(["check-config"]);
        let id = inst.create_volume("ceph:vol", "rbd-data", SIZE);
        let src = guard(&a, "volumes", &id);
        assert_eq!(src.size(), SIZE);
        write_first(&src);
        let expected = src.export();

        let b = backup(&inst, &format!("ceph:vol/{id}"), &[]);
        let expected_file = s.join("expected.img");
        std::fs::write(&expected_file, &expected).unwrap();
        let target = s
            .join("backup/vault")
            .join(format!("volume-{}.img", json_str(&b, "target_volume_id")));
        assert_same(&expected_file, &target, SIZE);

        let rid = restore(&inst, &b, "ceph:vol");
        let restored = guard(&a, "volumes", &rid);
        assert_same_bytes("restore into rbd", &expected, &restored.export());

        // Clean up through volback too: the engine removes its snapshots.
        let listed = inst.json(["volume", "list", "ceph:vol", "--json"]);
        let listed = listed.as_array().expect("an array");
        assert!(
            listed.iter().any(|v| json_str(&v["volume"], "id") == id),
            "{listed:?}"
        );
    });
}

fn snap_names(conf: &Path, img: &RbdImage) -> Vec<String> {
    rbd_snaps(conf, &img.spec())
        .iter()
        .map(|v| json_str(v, "name").to_owned())
        .collect()
}

/// A volume another client holds open for writing is backed up through a
/// snapshot, never read live. The snapshot stays as the base of the next
/// incremental (RBD diffs need it), is replaced by the next backup's, and
/// goes with the backup that kept it.
#[test]
fn in_use_rbd_volume_is_backed_up_through_a_snapshot() {
    use volback_connectors::rbd::{RbdDevice, RbdSpec};
    let a = ceph_conf('A');
    with_scratch(|s| {
        let inst = rbd_and_vault(s, &a);
        let id = inst.create_volume("ceph:vol", "rbd-busy", SIZE);
        let src = guard(&a, "volumes", &id);
        write_first(&src);
        let at_first = src.export();
        // A hypervisor's open: librbd registers a watch on the image.
        let spec: RbdSpec = format!("rbd:volumes/{}:conf={}", src.name(), arg(&a))
            .parse()
            .unwrap();
        let holder = RbdDevice::open(&spec, true, 4).unwrap();
        let volume = format!("ceph:vol/{id}");

        let b1 = backup(&inst, &volume, &[]);
        assert_eq!(b1["from_snapshot"], Value::Bool(true), "{b1}");
        let snap1 = json_str(&b1, "source_snapshot_id").to_owned();
        assert_eq!(snap_names(&a, &src), vec![format!("snapshot-{snap1}")]);

        write_second(&src);
        let b2 = backup(&inst, &volume, &["--incremental"]);
        assert_eq!(json_str(&b2, "change_tracking"), "driver", "{b2}");
        let snap2 = json_str(&b2, "source_snapshot_id").to_owned();
        // The first backup's snapshot was the diff base; now only the
        // newest one is kept.
        assert_eq!(snap_names(&a, &src), vec![format!("snapshot-{snap2}")]);
        drop(holder);

        let rid = restore(&inst, &b1, "ceph:vol");
        let restored = guard(&a, "volumes", &rid);
        assert_same_bytes(
            "restore of the in-use backup",
            &at_first,
            &restored.export(),
        );

        for b in [&b2, &b1] {
            inst.ok(["backup", "delete", json_str(b, "id")]);
        }
        let left = rbd_snaps(&a, &src.spec());
        assert!(left.is_empty(), "snapshots left: {left:?}");
    });
}

// 2./3. rbd -> rbd, full then incremental ----------------------------------------

/// How a backup is expected to move its data.
#[derive(Clone, Copy, PartialEq)]
enum Transfer {
    /// The rbd driver's fast path (the default between two RBD backends).
    Fast,
    /// `--generic`: connectors and the copy engine.
    Generic,
}

/// Full then incremental backups of an rbd volume onto another RBD pool,
/// each restore compared with the source at its backup's snapshot.
fn full_then_incremental(
    inst: &Installation,
    src_pool: &str,
    src_conf: &Path,
    ceph_src: &str,
    transfer: Transfer,
) {
    let id = inst.create_volume(src_pool, "rbd-incr", SIZE);
    let src = guard(src_conf, ceph_src, &id);
    write_first(&src);
    let v1 = src.export();
    let spec = format!("{src_pool}/{id}");
    let flags: &[&str] = match transfer {
        Transfer::Fast => &[],
        Transfer::Generic => &["--generic"],
    };
    let (full_method, incr_method) = match transfer {
        Transfer::Fast => ("rbd-diff", "rbd-diff"),
        Transfer::Generic => ("full", "driver"),
    };

    let b1 = backup(inst, &spec, flags);
    assert_eq!(json_str(&b1, "mode"), "full", "{b1}");
    assert_eq!(json_str(&b1, "change_tracking"), full_method, "{b1}");
    // Only the allocated extents are read: 2.3 MiB of data, which this
    // test cluster's diffs report from the start of each object written
    // (fixtures/ceph.sh), so up to 6.5 MiB of 16.
    assert!(json_u64(&b1, "bytes_read") <= 7 * MIB, "{b1}");
    let (tconf, tpool) = target_of(inst, &b1);
    let _target = guard(&tconf, &tpool, json_str(&b1, "target_volume_id"));

    write_second(&src);
    let v2 = src.export();
    assert_ne!(v1, v2);

    let incremental = [flags, &["--incremental"]].concat();
    let b2 = backup(inst, &spec, &incremental);
    assert_eq!(json_str(&b2, "mode"), "incremental", "{b2}");
    assert_eq!(json_str(&b2, "change_tracking"), incr_method, "{b2}");
    // What changed, in 256 KiB map blocks: 64 KiB, 200 000 B (in an object
    // that did not exist, so reported from 8 MiB on) and a 512 KiB discard:
    // 8 blocks of the 64.
    let read = json_u64(&b2, "bytes_read");
    assert!(read <= 8 * 256 * KIB, "read {read} bytes: {b2}");
    assert_eq!(
        json_str(&b2, "target_volume_id"),
        json_str(&b1, "target_volume_id"),
        "{b2}"
    );

    for (b, expected, what) in [(&b1, &v1, "full"), (&b2, &v2, "incremental")] {
        let rid = restore(inst, b, src_pool);
        let restored = guard(src_conf, ceph_src, &rid);
        assert_same_bytes(
            &format!("restore of the {what} backup"),
            expected,
            &restored.export(),
        );
    }

    // Deleting the backups removes their snapshots (restore points in the
    // target, kept source snapshots) and the target volume, through the
    // driver's delete_snapshot and delete_volume.
    for b in [&b2, &b1] {
        inst.ok(["backup", "delete", json_str(b, "id")]);
    }
    let snaps = rbd_snaps(src_conf, &src.spec());
    assert!(snaps.is_empty(), "source snapshots left: {snaps:?}");
    assert!(
        !rbd_exists(
            &tconf,
            &tpool,
            &format!("volume-{}", json_str(&b1, "target_volume_id"))
        ),
        "the target volume is left after its last backup was deleted"
    );
    inst.ok(["volume", "delete", &spec]);
    assert!(!rbd_exists(src_conf, ceph_src, src.name()));
}

/// The cluster conf and Ceph pool of a backup's target (from the test's
/// naming: backend `a` is cluster A, `b` cluster B; pool names are Ceph's).
fn target_of(inst: &Installation, b: &Value) -> (PathBuf, String) {
    let _ = inst;
    let backend = json_str(b, "target_backend");
    let conf = match backend {
        "a" => ceph_conf('A'),
        "b" => ceph_conf('B'),
        other => panic!("unexpected target backend {other}"),
    };
    (conf, json_str(b, "target_pool").to_owned())
}

#[test]
fn rbd_to_rbd_across_pools_full_then_incremental() {
    let a = ceph_conf('A');
    with_scratch(|s| {
        let inst = installation(
            s,
            &format!(
                "backends:
  - name: a
    driver: rbd
    options: {{conf: {}, connect_timeout: 10}}
    pools: {{volumes: volumes, backups: backups}}
backup:
  default_target: a:backups
  catalog: catalog.db
",
                conf_arg(&a)
            ),
        );
        inst.ok(["check-config"]);
        full_then_incremental(&inst, "a:volumes", &a, "volumes", Transfer::Fast);
        // The same through the generic path, on request.
        full_then_incremental(&inst, "a:volumes", &a, "volumes", Transfer::Generic);
    });
}

#[test]
fn rbd_to_rbd_across_clusters_full_then_incremental() {
    let (a, b) = (ceph_conf('A'), ceph_conf('B'));
    with_scratch(|s| {
        let inst = installation(
            s,
            &format!(
                "backends:
  - name: a
    driver: rbd
    options: {{conf: {}}}
    pools: {{volumes: volumes}}
  - name: b
    driver: rbd
    options: {{conf: {}}}
    pools: {{backups: backups}}
backup:
  default_target: b:backups
  catalog: catalog.db
",
                conf_arg(&a),
                conf_arg(&b)
            ),
        );
        inst.ok(["check-config"]);
        full_then_incremental(&inst, "a:volumes", &a, "volumes", Transfer::Fast);
    });
}

/// volback killed right after the fast path moved the data: recovery
/// removes the half-made backup's image, its exports and the source
/// snapshot, marks the backup error, and the source is untouched.
#[test]
fn crash_after_a_fast_path_copy_leaves_no_orphans() {
    use std::os::unix::process::ExitStatusExt;
    let a = ceph_conf('A');
    with_scratch(|s| {
        let inst = installation(
            s,
            &format!(
                "backends:
  - name: a
    driver: rbd
    options: {{conf: {}}}
    pools: {{volumes: volumes, backups: backups}}
backup:
  default_target: a:backups
  catalog: catalog.db
",
                conf_arg(&a)
            ),
        );
        let id = inst.create_volume("a:volumes", "rbd-crash", SIZE);
        let src = guard(&a, "volumes", &id);
        write_first(&src);
        let before = src.export();

        let spec = format!("a:volumes/{id}");
        let mut cmd = inst.command(["backup", "create", &spec, "--progress", "none"]);
        cmd.env("FAILPOINTS", "backup_after_copy=return");
        let r = run(cmd);
        assert_eq!(
            r.status().signal(),
            Some(libc::SIGABRT),
            "expected an abort at the fail point (failpoints build?)\n{}",
            r.describe()
        );
        let list = inst.backups();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(json_str(&list[0], "change_tracking"), "full", "{list:?}");
        let target = json_str(&list[0], "target_volume_id").to_owned();
        let _target = guard(&a, "backups", &target);
        assert!(rbd_exists(&a, "backups", &format!("volume-{target}")));

        let rec = inst.json(["recover", "--json"]);
        assert_eq!(json_u64(&rec, "operations"), 1, "{rec}");
        let list = inst.backups();
        assert_eq!(json_str(&list[0], "state"), "error", "{list:?}");
        assert!(
            !rbd_exists(&a, "backups", &format!("volume-{target}")),
            "the half-made backup's image is left"
        );
        assert!(snap_names(&a, &src).is_empty(), "a source snapshot is left");
        assert_same_bytes("the source after the crash", &before, &src.export());
    });
}

// 4. the same-pool rule ----------------------------------------------------------

#[test]
fn same_ceph_pool_under_two_names_is_refused() {
    let (a, b) = (ceph_conf('A'), ceph_conf('B'));
    with_scratch(|s| {
        let yaml = |pools: &str, extra: &str| {
            format!(
                "backends:
  - name: a
    driver: rbd
    options: {{conf: {}}}
    pools: {{{pools}}}
{extra}backup:
  default_target: a:vault
  catalog: catalog.db
",
                conf_arg(&a)
            )
        };
        let inst = installation(s, &yaml("gold: volumes, vault: volumes", ""));
        let r = inst.err(["check-config"]);
        assert!(
            r.stderr.contains("same storage") && r.stderr.contains("a:gold"),
            "{}",
            r.describe()
        );

        // Another pool of the same cluster is allowed.
        let inst = installation(s, &yaml("gold: volumes, vault: backups", ""));
        inst.ok(["check-config"]);

        // Pool `backups` of cluster B is not pool `backups` of cluster A.
        let other = format!(
            "  - name: b
    driver: rbd
    options: {{conf: {}}}
    pools: {{backups: backups}}
    backup_target: a:vault
",
            conf_arg(&b)
        );
        let inst = installation(s, &yaml("gold: volumes, vault: backups", &other));
        inst.ok(["check-config"]);
    });
}

// 5. an unreachable cluster --------------------------------------------------------

#[test]
fn unreachable_cluster_fails_fast_and_clearly() {
    with_scratch(|s| {
        let conf = s.join("dead.conf");
        std::fs::write(
            &conf,
            "[global]
mon_host = 127.0.0.1:1
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
",
        )
        .unwrap();
        let inst = installation(
            s,
            "backends:
  - name: dead
    driver: rbd
    options: {conf: dead.conf}
    pools: {vol: volumes}
  - name: backup
    driver: file
    pools: {vault: backup/vault}
backup:
  default_target: backup:vault
  catalog: catalog.db
",
        );
        for args in [
            vec!["check-config"],
            vec!["backup", "create", "dead:vol/x", "--json"],
        ] {
            let start = Instant::now();
            let r = inst.err(&args);
            let took = start.elapsed();
            assert!(
                took < Duration::from_secs(15),
                "{args:?} took {took:?}\n{}",
                r.describe()
            );
            assert!(
                r.stderr.contains("dead")
                    && r.stderr.contains(&arg(&conf))
                    && r.stderr.contains("connect"),
                "{args:?}: the error names neither the backend nor the conf\n{}",
                r.describe()
            );
        }
        // Nothing is recorded: the same catalog, without the dead backend.
        let ok = Installation::create(s.path(), "alive.yaml", "catalog.db", "");
        assert!(ok.backups().is_empty(), "{:?}", ok.backups());
    });
}

// 6. the driver itself -------------------------------------------------------------

mod driver {
    use std::collections::BTreeMap;

    use volback_connectors::rbd::ClusterConfig;
    use volback_drivers::rbd::RbdDriver;
    use volback_drivers::{
        ChangedRange, DriverErrorKind, ExportOptions, ExportTarget, Metadata, VolumeDriver,
    };

    use super::*;

    fn driver(conf: &Path) -> RbdDriver {
        let cluster = ClusterConfig {
            conf: Some(conf.to_path_buf()),
            ..ClusterConfig::default()
        };
        let pools = BTreeMap::from([
            ("gold".to_string(), "volumes".to_string()),
            ("alias".to_string(), "volumes".to_string()),
            ("vault".to_string(), "backups".to_string()),
        ]);
        RbdDriver::new("t", cluster, pools).unwrap()
    }

    #[test]
    fn volumes_snapshots_clones_and_changes() {
        let a = ceph_conf('A');
        let d = driver(&a);
        let id = unique_name("drv");
        let clone_id = unique_name("drv-clone");
        // Guards drop in reverse order: the clone before its parent.
        let img = guard(&a, "volumes", &id);
        let clone_img = guard(&a, "volumes", &clone_id);

        // Identity: two names of one Ceph pool are one pool.
        assert_eq!(
            d.pool_identity("gold").unwrap(),
            d.pool_identity("alias").unwrap()
        );
        assert_ne!(
            d.pool_identity("gold").unwrap(),
            d.pool_identity("vault").unwrap()
        );
        assert!(d.pool_identity("gold").unwrap().0.starts_with("rbd:fsid="));

        let meta = Metadata::from([("k".to_string(), "v w".to_string())]);
        let v = d
            .create_volume("gold", &id, "my vol", 8 * MIB, &meta)
            .unwrap();
        assert_eq!(
            (v.name.as_str(), v.size, &v.metadata),
            ("my vol", 8 * MIB, &meta)
        );
        let e = d
            .create_volume("gold", &id, "again", MIB, &meta)
            .unwrap_err();
        assert_eq!(e.kind, DriverErrorKind::AlreadyExists, "{e}");
        assert_eq!(d.get_volume("gold", &id).unwrap(), v);
        assert!(d.list_volumes("gold").unwrap().contains(&v));
        let e = d.get_volume("gold", "nope").unwrap_err();
        assert_eq!(e.kind, DriverErrorKind::NotFound);
        assert!(
            e.to_string().contains("gold") && e.to_string().contains("nope"),
            "{e}"
        );
        assert!(!d.in_use("gold", &id).unwrap());
        // A client holding the image open for writing makes it in use.
        {
            use volback_connectors::rbd::{RbdDevice, RbdSpec};
            let spec: RbdSpec = format!("rbd:{}/volume-{id}:conf={}", img.pool(), a.display())
                .parse()
                .unwrap();
            let _writer = RbdDevice::open(&spec, true, 4).unwrap();
            assert!(
                d.in_use("gold", &id).unwrap(),
                "a writable open watches the image"
            );
        }
        assert!(
            !d.in_use("gold", &id).unwrap(),
            "the watch goes with the close"
        );
        // Capacity is what the cluster reports (rados_cluster_stat); the
        // fixture's clusters run without a mgr, which is where Ceph keeps
        // those statistics, so only consistency can be asserted here.
        let pools = d.pools().unwrap();
        assert_eq!(pools.len(), 3, "{pools:?}");
        assert!(
            pools.iter().all(|p| p.free_bytes <= p.capacity_bytes),
            "{pools:?}"
        );

        // Fill, snapshot, change, snapshot: exact changed ranges.
        img.fill(7);
        let s1 = unique_name("s1");
        let s2 = unique_name("s2");
        d.create_snapshot("gold", &id, &s1).unwrap();
        img.write(MIB + 4096, &random_bytes(8192, 8));
        img.write(6 * MIB, &random_bytes(4096, 9));
        img.discard(4 * MIB, 4 * MIB); // a whole object: gone
        let info = d.create_snapshot("gold", &id, &s2).unwrap();
        assert_eq!(info.size, 8 * MIB);
        let ranges = d.changed_ranges("gold", &s1, &s2).unwrap().unwrap();
        assert_eq!(
            ranges,
            vec![
                ChangedRange {
                    offset: MIB + 4096,
                    len: 8192
                },
                ChangedRange {
                    offset: 4 * MIB,
                    len: 4 * MIB
                },
            ]
        );
        assert_eq!(d.changed_ranges("gold", &s2, &s2).unwrap().unwrap(), vec![]);

        // Exports.
        let c = d
            .export(
                "gold",
                &ExportTarget::Snapshot(s1.clone()),
                ExportOptions::default(),
            )
            .unwrap();
        assert_eq!(c.connector, "rbd");
        assert!(c.read_only);
        assert_eq!(c.properties["pool"], "volumes");
        assert_eq!(c.properties["image"], format!("volume-{id}"));
        assert_eq!(c.properties["snapshot"], format!("snapshot-{s1}"));
        assert_eq!(c.properties["conf"], arg(&a));
        let c = d
            .export(
                "gold",
                &ExportTarget::Volume(id.clone()),
                ExportOptions::default(),
            )
            .unwrap();
        assert!(!c.read_only && !c.properties.contains_key("snapshot"));
        d.unexport("gold", &ExportTarget::Volume(id.clone()))
            .unwrap();

        // A clone of s1 reads as s1.
        let cv = d
            .create_volume_from_snapshot("gold", &s1, &clone_id, "clone")
            .unwrap();
        assert_eq!(cv.size, 8 * MIB);
        assert_eq!(
            clone_img.export(),
            img.export_snap(&format!("snapshot-{s1}"))
        );
        // s1 is protected for the clone: not deletable while it exists.
        let e = d.delete_snapshot("gold", &s1).unwrap_err();
        assert_eq!(e.kind, DriverErrorKind::Busy, "{e}");

        // A volume with snapshots is not deleted.
        let e = d.delete_volume("gold", &id).unwrap_err();
        assert_eq!(e.kind, DriverErrorKind::Busy, "{e}");

        d.delete_volume("gold", &clone_id).unwrap();
        d.delete_volume("gold", &clone_id).unwrap();
        d.delete_snapshot("gold", &s1).unwrap();
        d.delete_snapshot("gold", &s1).unwrap();
        d.delete_snapshot("gold", &s2).unwrap();
        d.delete_volume("gold", &id).unwrap();
        d.delete_volume("gold", &id).unwrap();
        assert!(!rbd_exists(&a, "volumes", img.name()));
    }
}
