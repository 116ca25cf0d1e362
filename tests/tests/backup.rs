//! Backup and restore flows of the `volback` CLI on file pools with real loop
//! devices (run as root; build the binary with the fail points:
//! `cargo build --workspace --bins --features volback-engine/failpoints`).
//!
//! Every test gets its own scratch directory holding the pools, the
//! configuration and the catalog. Guards detach what a test attached and
//! unmount what it mounted, also when it fails; [`with_scratch`] checks
//! afterwards that no loop device still refers to the scratch directory.

use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;
use volback_tests::*;

const GOLD: &str = "primary:gold";
const SILVER: &str = "primary:silver";
const VAULT: &str = "backup:vault";

/// A layout that is mostly holes: random data islands, explicitly written
/// zeroes, a constant block, and data in the last MiB.
fn mostly_holes(size: u64) -> Vec<Region> {
    assert!(size >= 32 * MIB);
    vec![
        Region::random(0, MIB, 11),
        // Written (allocated) zeroes: must read back as zeroes, and need
        // not be allocated in a new volume.
        Region::zeros(MIB, 2 * MIB),
        Region::random(3 * MIB + 4 * KIB, 60 * KIB, 12),
        Region::byte(8 * MIB, 512 * KIB, 0x5A),
        Region::zeros(8 * MIB + 512 * KIB, 4 * KIB),
        Region::random(20 * MIB + 12345, 100_000, 13),
        Region::random(size - MIB, MIB, 14),
    ]
}

/// `backup create VOL [extra...] --json`, asserting success.
fn backup_json(inst: &Installation, volume: &str, extra: &[&str]) -> Value {
    let mut args = vec!["backup", "create", volume];
    args.extend_from_slice(extra);
    args.push("--json");
    inst.json(args)
}

/// `restore ID [extra...] --json`, asserting success.
fn restore_json(inst: &Installation, backup: &str, extra: &[&str]) -> Value {
    let mut args = vec!["restore", backup];
    args.extend_from_slice(extra);
    args.push("--json");
    inst.json(args)
}

/// `volume list --json` entries of `backend:pool`: (id, name, size).
fn volumes_in(inst: &Installation, pool: &str) -> Vec<(String, String, u64)> {
    let v = inst.json(["volume", "list", pool, "--json"]);
    let Value::Array(list) = v else {
        panic!("volume list --json is not an array: {v}");
    };
    list.iter()
        .map(|e| {
            let vol = &e["volume"];
            (
                json_str(vol, "id").to_owned(),
                json_str(vol, "name").to_owned(),
                json_u64(vol, "size"),
            )
        })
        .collect()
}

/// Files named `snapshot-*` in any pool of the installation.
fn snapshot_files(inst: &Installation) -> Vec<String> {
    [GOLD, SILVER, VAULT]
        .iter()
        .flat_map(|p| {
            dir_entries(inst.pool_dir(p))
                .into_iter()
                .filter(|n| n.starts_with("snapshot-"))
                .map(move |n| format!("{p}: {n}"))
        })
        .collect()
}

/// The snapshot files the catalog accounts for: each backup's restore
/// point (`target_snapshot_id`, in its target pool) and the source snapshot
/// it keeps for change tracking (`source_snapshot_id`, in the source pool).
fn kept_snapshot_files(inst: &Installation) -> Vec<String> {
    let mut kept = Vec::new();
    for b in inst.backups() {
        for (field, backend, pool) in [
            ("target_snapshot_id", "target_backend", "target_pool"),
            ("source_snapshot_id", "volume_backend", "volume_pool"),
        ] {
            if let Some(snap) = b.get(field).and_then(Value::as_str) {
                let p = format!("{}:{}", json_str(&b, backend), json_str(&b, pool));
                kept.push(format!("{p}: snapshot-{snap}.img"));
                kept.push(format!("{p}: snapshot-{snap}.json"));
            }
        }
    }
    kept.sort();
    kept
}

/// Asserts that every snapshot file in the pools is one the catalog keeps:
/// no temporary snapshot was left behind.
fn assert_no_stray_snapshots(inst: &Installation, what: &str) {
    let mut found = snapshot_files(inst);
    found.sort();
    let kept = kept_snapshot_files(inst);
    let stray: Vec<_> = found.iter().filter(|f| !kept.contains(f)).collect();
    assert!(
        stray.is_empty(),
        "{what}: snapshots left behind that no backup keeps: {stray:?} (kept: {kept:?})"
    );
    let missing: Vec<_> = kept.iter().filter(|f| !found.contains(f)).collect();
    assert!(
        missing.is_empty(),
        "{what}: snapshots the catalog names are missing: {missing:?}"
    );
}

/// The restore-point snapshot image of a backup, if it has one.
fn restore_point(inst: &Installation, backup: &Value) -> Option<std::path::PathBuf> {
    let snap = backup.get("target_snapshot_id")?.as_str()?;
    let pool = format!(
        "{}:{}",
        json_str(backup, "target_backend"),
        json_str(backup, "target_pool")
    );
    Some(inst.pool_dir(&pool).join(format!("snapshot-{snap}.img")))
}

/// Asserts that a backup's data volume, and its restore point if it has
/// one, equal `reference`.
fn assert_backup_data(inst: &Installation, backup: &Value, reference: &Path, size: u64) {
    let tid = json_str(backup, "target_volume_id");
    assert_same(reference, inst.volume_img(VAULT, tid), size);
    if let Some(point) = restore_point(inst, backup) {
        assert!(
            point.is_file(),
            "restore point {} is missing",
            point.display()
        );
        assert_same(reference, &point, size);
    }
}

/// The pools' file listings, to show that an operation created nothing.
fn pool_listing(inst: &Installation) -> Vec<(String, Vec<String>)> {
    [GOLD, SILVER, VAULT]
        .iter()
        .map(|p| (p.to_string(), dir_entries(inst.pool_dir(p))))
        .collect()
}

fn assert_sparse_restore(img: &Path, size: u64) {
    let alloc = allocated_bytes(img);
    assert!(
        alloc < 8 * MIB,
        "{} is not sparse: {alloc} bytes allocated of {size}; data extents: {:?}",
        img.display(),
        data_extents(img)
    );
    assert!(
        !has_data_in(img, 24 * MIB..size - MIB),
        "the source's hole [24 MiB, {} MiB) was allocated in {}; data extents: {:?}",
        size / MIB - 1,
        img.display(),
        data_extents(img)
    );
}

// 1. backup and restore across pools ----------------------------------------

#[test]
fn backup_and_restore_across_pools() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = Installation::new(s);
        let size = 64 * MIB;
        let regions = mostly_holes(size);
        let id = inst.create_volume(GOLD, "data-1", size);
        let src = inst.volume_img(GOLD, &id);
        create_file(&src, size, &regions);
        let reference = s.join("source.ref");
        create_file(&reference, size, &regions);

        // Default target: backup:vault.
        let spec = format!("{GOLD}/{id}");
        let b = backup_json(&inst, &spec, &[]);
        let bid = json_str(&b, "id").to_owned();
        assert_eq!(json_str(&b, "state"), "available", "{b}");

        let shown = inst.show_backup(&bid);
        assert_eq!(json_str(&shown, "state"), "available", "{shown}");
        assert_eq!(json_str(&shown, "volume_id"), id, "{shown}");
        assert_eq!(json_str(&shown, "volume_name"), "data-1", "{shown}");
        assert_eq!(json_u64(&shown, "volume_size"), size, "{shown}");
        assert_eq!(json_str(&shown, "volume_backend"), "primary", "{shown}");
        assert_eq!(json_str(&shown, "volume_pool"), "gold", "{shown}");
        assert_eq!(json_str(&shown, "target_backend"), "backup", "{shown}");
        assert_eq!(json_str(&shown, "target_pool"), "vault", "{shown}");
        // Not in use, no --snapshot: read directly, unless the driver
        // tracks changes (then a source snapshot is read and kept).
        if shown["source_snapshot_id"].is_null() {
            assert_eq!(shown["from_snapshot"], Value::Bool(false), "{shown}");
        }
        // An XXH3-128 digest (possibly of a block map: `map-xxh3-128:B:<hex>`).
        let checksum = json_str(&shown, "checksum").to_owned();
        let hex = checksum.rsplit(':').next().unwrap_or_default();
        assert!(
            checksum.contains("xxh3-128:")
                && hex.len() == 32
                && hex.chars().all(|c| c.is_ascii_hexdigit()),
            "checksum {checksum:?} is not an xxh3-128 digest"
        );
        assert!(json_u64(&shown, "bytes_read") > 0, "{shown}");

        // The backup's data: a new, sparse volume of the vault pool, equal
        // to the source.
        let tid = json_str(&shown, "target_volume_id").to_owned();
        let data = inst.volume_img(VAULT, &tid);
        assert!(data.is_file(), "no backup data volume {}", data.display());
        assert_eq!(file_size(&data), size);
        assert_same(&reference, &data, size);
        assert_sparse_restore(&data, size);
        assert_backup_data(&inst, &shown, &reference, size);
        assert_no_stray_snapshots(&inst, "after the backup");
        let r = inst.json(["backup", "verify", &bid, "--json"]);
        assert_eq!(json_str(&r, "checksum"), checksum, "backup verify: {r}");
        let vault_vols = volumes_in(&inst, VAULT);
        assert_eq!(vault_vols.len(), 1, "{vault_vols:?}");
        assert_eq!(vault_vols[0].0, tid);
        assert_eq!(vault_vols[0].2, size);
        // The source is untouched.
        assert_same(&reference, &src, size);

        // Restore to a new volume on primary:silver (verified) ...
        let r = restore_json(
            &inst,
            &bid,
            &["--to", SILVER, "--name", "restored-silver", "--verify"],
        );
        assert_eq!(json_str(&r, "backend"), "primary", "{r}");
        assert_eq!(json_str(&r, "pool"), "silver", "{r}");
        let restore_checksum = json_str(&r, "checksum").to_owned();
        assert_eq!(
            restore_checksum, checksum,
            "a restore reads exactly the backup's data: {r}"
        );
        let silver_id = json_str(&r, "volume").to_owned();
        let silver_img = inst.volume_img(SILVER, &silver_id);
        assert_eq!(file_size(&silver_img), size);
        assert_same(&reference, &silver_img, size);
        assert_sparse_restore(&silver_img, size);
        assert_eq!(
            volumes_in(&inst, SILVER),
            vec![(silver_id.clone(), "restored-silver".to_owned(), size)]
        );

        // ... to a new volume on the other backend's pool ...
        let r = restore_json(&inst, &bid, &["--to", VAULT, "--name", "restored-vault"]);
        assert_eq!(json_str(&r, "backend"), "backup", "{r}");
        assert_eq!(json_str(&r, "pool"), "vault", "{r}");
        let vault_id = json_str(&r, "volume").to_owned();
        assert_ne!(vault_id, tid);
        assert_eq!(json_str(&r, "checksum"), restore_checksum, "{r}");
        let vault_img = inst.volume_img(VAULT, &vault_id);
        assert_same(&reference, &vault_img, size);
        assert_sparse_restore(&vault_img, size);

        // ... and by default to the source's pool.
        let r = restore_json(&inst, &bid, &[]);
        assert_eq!(json_str(&r, "backend"), "primary", "{r}");
        assert_eq!(json_str(&r, "pool"), "gold", "{r}");
        let gold_id = json_str(&r, "volume").to_owned();
        assert_ne!(gold_id, id);
        assert_same(&reference, inst.volume_img(GOLD, &gold_id), size);

        // The backup is still available, and nothing temporary is left.
        assert_eq!(
            json_str(&inst.show_backup(&bid), "state"),
            "available",
            "after the restores"
        );
        assert_no_stray_snapshots(&inst, "after the restores");
        assert_same(&reference, &src, size);
    });
}

// 2. in-use backup through a temporary snapshot -----------------------------

#[test]
fn in_use_volume_is_backed_up_through_a_temporary_snapshot() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = Installation::new(s);
        let size = 32 * MIB;
        let regions = mostly_holes(size);
        let reference = s.join("source.ref");
        create_file(&reference, size, &regions);

        let id = inst.create_volume(GOLD, "busy", size);
        let attached = inst.attach(GOLD, &id);
        assert!(attached.still_attached());
        // Written through the device and left open, not synced: the
        // driver must flush the device before taking the snapshot.
        let dev = std::fs::OpenOptions::new()
            .write(true)
            .open(attached.path())
            .unwrap_or_else(|e| panic!("opening {}: {e}", attached.path().display()));
        write_regions(&dev, &regions);

        let spec = format!("{GOLD}/{id}");
        let b = backup_json(&inst, &spec, &[]);
        drop(dev);
        assert_eq!(json_str(&b, "state"), "available", "{b}");
        assert_eq!(b["from_snapshot"], Value::Bool(true), "{b}");
        assert_no_stray_snapshots(&inst, "in-use backup");
        assert!(
            attached.still_attached(),
            "the user's loop device {} was detached from the volume by the backup",
            attached.path().display()
        );
        assert_backup_data(&inst, &b, &reference, size);
        // And it restores to the same data.
        let r = restore_json(&inst, json_str(&b, "id"), &["--to", SILVER]);
        assert_same(
            &reference,
            inst.volume_img(SILVER, json_str(&r, "volume")),
            size,
        );
        drop(attached);

        // --snapshot on a volume nobody uses.
        let id2 = inst.create_volume(GOLD, "idle", size);
        let img2 = inst.volume_img(GOLD, &id2);
        create_file(&img2, size, &regions);
        let b2 = backup_json(&inst, &format!("{GOLD}/{id2}"), &["--snapshot"]);
        assert_eq!(json_str(&b2, "state"), "available", "{b2}");
        assert_eq!(b2["from_snapshot"], Value::Bool(true), "{b2}");
        assert_no_stray_snapshots(&inst, "--snapshot backup");
        assert_backup_data(&inst, &b2, &reference, size);
        assert_same(&reference, &img2, size);
        assert!(
            loop_devices_referencing(&inst.pool_dir(GOLD)).is_empty(),
            "{:?}",
            loop_devices_referencing(&inst.pool_dir(GOLD))
        );
    });
}

// 3. same-pool refusal -------------------------------------------------------

/// The installation's configuration with pool `vault` at `vault_dir`.
fn config_with_vault(inst: &Installation, name: &str, vault_dir: &str) -> Installation {
    let yaml = installation_yaml("catalog.db", "")
        .replace("vault: backup/vault", &format!("vault: {vault_dir}"));
    let config = inst.dir.join(name);
    std::fs::write(&config, yaml).unwrap();
    Installation {
        dir: inst.dir.clone(),
        config,
    }
}

fn assert_same_pool_refused(inst: &Installation, what: &str) {
    let r = inst.err(["check-config"]);
    for pool in [GOLD, VAULT] {
        assert!(
            r.stderr.contains(pool),
            "{what}: the error does not name {pool}\n{}",
            r.describe()
        );
    }
    // Any command refuses the configuration, not only check-config.
    let r = inst.err(["backup", "list"]);
    assert!(r.stderr.contains(GOLD), "{what}\n{}", r.describe());
}

#[test]
fn same_pool_is_refused_at_config_load_and_per_request() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = Installation::new(s);
        let gold = inst.pool_dir(GOLD);
        let root = s.path().display().to_string();

        // (a) The same directory spelt differently.
        for (i, spelling) in [
            format!("{root}/primary/../primary/gold/"),
            "./primary//gold".to_owned(),
            format!("{root}/backup/../primary/./gold"),
        ]
        .iter()
        .enumerate()
        {
            let c = config_with_vault(&inst, &format!("spelling-{i}.yaml"), spelling);
            assert_same_pool_refused(&c, &format!("vault at {spelling}"));
        }

        // (b) A symlink to it.
        std::os::unix::fs::symlink("primary/gold", s.join("gold-link")).unwrap();
        let c = config_with_vault(&inst, "symlink.yaml", "gold-link");
        assert_same_pool_refused(&c, "vault through a symlink");

        // (c) A bind mount of it.
        std::fs::create_dir(s.join("bind")).unwrap();
        {
            let _mount = BindMount::new(&gold, s.join("bind"));
            let c = config_with_vault(&inst, "bind.yaml", &format!("{root}/bind"));
            assert_same_pool_refused(&c, "vault through a bind mount");
        }

        // Another directory on the same file system is fine.
        let r = inst.ok(["check-config"]);
        assert!(
            r.stderr.trim().is_empty() || !r.stderr.contains("error"),
            "{}",
            r.describe()
        );
        let v = inst.json(["check-config", "--json"]);
        assert_eq!(v["valid"], Value::Bool(true), "{v}");
        let pools = v["pools"].as_array().expect("pools array");
        assert_eq!(pools.len(), 3, "{v}");
        for p in pools {
            if json_str(p, "backend") == "primary" {
                assert_eq!(json_str(p, "backup_target"), VAULT, "{v}");
            }
        }
        let c = config_with_vault(&inst, "other-dir.yaml", &format!("{root}/primary/silver-2"));
        std::fs::create_dir(s.join("primary/silver-2")).unwrap();
        c.ok(["check-config"]);

        // Per request: --to the source's own pool.
        let id = inst.create_volume(GOLD, "src", 16 * MIB);
        create_file(
            inst.volume_img(GOLD, &id),
            16 * MIB,
            &[Region::random(0, MIB, 5)],
        );
        let before = pool_listing(&inst);
        let r = inst.err(["backup", "create", &format!("{GOLD}/{id}"), "--to", GOLD]);
        assert!(
            r.stderr.contains(GOLD) && r.stderr.contains("same"),
            "the refusal does not say the pools are the same\n{}",
            r.describe()
        );
        assert_eq!(
            pool_listing(&inst),
            before,
            "the refused backup created files"
        );
        assert!(inst.backups().is_empty(), "{:?}", inst.backups());

        // The same volume named by id alone, --to with --snapshot: refused too.
        let r = inst.err(["backup", "create", &id, "--to", GOLD, "--snapshot"]);
        assert!(r.stderr.contains(GOLD), "{}", r.describe());
        assert_eq!(
            pool_listing(&inst),
            before,
            "the refused backup created files"
        );
        assert!(inst.backups().is_empty(), "{:?}", inst.backups());
    });
}

// 4. restore onto an existing volume ------------------------------------------

#[test]
fn restore_onto_an_existing_volume_needs_force_and_enough_room() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = Installation::new(s);
        let size = 32 * MIB;
        let regions = mostly_holes(size);
        let reference = s.join("source.ref");
        create_file(&reference, size, &regions);
        let id = inst.create_volume(GOLD, "src", size);
        create_file(inst.volume_img(GOLD, &id), size, &regions);
        let b = backup_json(&inst, &format!("{GOLD}/{id}"), &[]);
        let bid = json_str(&b, "id").to_owned();

        // An existing volume full of 0xAB.
        let ab = s.join("ab.ref");
        create_filled_file(&ab, size, 0xAB);
        let existing = inst.create_volume(SILVER, "existing", size);
        let existing_img = inst.volume_img(SILVER, &existing);
        create_filled_file(&existing_img, size, 0xAB);
        let existing_spec = format!("{SILVER}/{existing}");

        // Without --force: refused, untouched.
        for spec in [existing_spec.as_str(), existing.as_str()] {
            let r = inst.err(["restore", &bid, "--volume", spec]);
            assert!(
                r.stderr.contains("--force"),
                "the refusal does not mention --force\n{}",
                r.describe()
            );
            assert_same(&ab, &existing_img, size);
        }
        assert_eq!(json_str(&inst.show_backup(&bid), "state"), "available");

        // With --force: equal to the source, zeroes included.
        let r = restore_json(
            &inst,
            &bid,
            &["--volume", &existing_spec, "--force", "--verify"],
        );
        assert_eq!(json_str(&r, "volume"), existing, "{r}");
        assert_eq!(json_str(&r, "pool"), "silver", "{r}");
        assert_same(&reference, &existing_img, size);
        assert_eq!(
            volumes_in(&inst, SILVER).len(),
            1,
            "restore created a volume"
        );

        // A smaller volume: refused even with --force, untouched.
        let small = inst.create_volume(SILVER, "small", size / 2);
        let small_img = inst.volume_img(SILVER, &small);
        create_filled_file(&small_img, size / 2, 0xCD);
        let cd = s.join("cd.ref");
        create_filled_file(&cd, size / 2, 0xCD);
        let r = inst.err([
            "restore",
            &bid,
            "--volume",
            &format!("{SILVER}/{small}"),
            "--force",
        ]);
        assert!(
            r.stderr.contains("smaller"),
            "the refusal does not say the volume is too small\n{}",
            r.describe()
        );
        assert_same(&cd, &small_img, size / 2);
        assert_eq!(file_size(&small_img), size / 2);
        assert_eq!(json_str(&inst.show_backup(&bid), "state"), "available");
    });
}

// 5. export / import ---------------------------------------------------------

/// Runs `cmd` with `input` on its standard input.
fn run_with_stdin(mut cmd: std::process::Command, input: &str) -> Run {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawning volback");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .expect("writing stdin");
    let output = child.wait_with_output().expect("waiting for volback");
    Run {
        command: format!("{cmd:?} < record"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        output,
        elapsed: start.elapsed(),
    }
}

#[test]
fn export_import_round_trip_and_bad_records() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let first = Installation::new(s);
        let second = first.sibling("second.yaml", "catalog-2.db", "");
        let size = 32 * MIB;
        let regions = mostly_holes(size);
        let reference = s.join("source.ref");
        create_file(&reference, size, &regions);
        let id = first.create_volume(GOLD, "exported", size);
        create_file(first.volume_img(GOLD, &id), size, &regions);
        let b = backup_json(&first, &format!("{GOLD}/{id}"), &[]);
        let bid = json_str(&b, "id").to_owned();

        let record = first
            .ok(["backup", "export", &bid])
            .stdout
            .trim()
            .to_owned();
        assert!(!record.is_empty());
        assert!(second.backups().is_empty());

        // Bad records: each refused with a reason, nothing imported.
        let b64 = base64::engine::general_purpose::STANDARD;
        let json = String::from_utf8(b64.decode(&record).expect("the record is base64"))
            .expect("the record is JSON text");
        assert!(json.contains("\"exported\""), "{json}");
        let tampered = b64.encode(json.replacen("\"exported\"", "\"exportee\"", 1));
        let size_tampered = b64.encode(json.replacen(
            &format!("\"volume_size\":{size}"),
            &format!("\"volume_size\":{}", size + 512),
            1,
        ));
        let truncated = record[..record.len() / 2].to_owned();
        let truncated_odd = record[..record.len() - 3].to_owned();
        let garbage_b64 = b64.encode("hello, this is not a record");
        for (what, bad, word) in [
            ("tampered name", tampered.as_str(), "altered"),
            ("tampered size", size_tampered.as_str(), "altered"),
            ("truncated", truncated.as_str(), "refused"),
            ("truncated (not base64)", truncated_odd.as_str(), "refused"),
            ("garbage", "!!! not a record !!!", "base64"),
            ("garbage base64", garbage_b64.as_str(), "refused"),
        ] {
            let r = second.err(["backup", "import", bad]);
            assert!(
                r.stderr.contains(word) && r.stderr.contains("record"),
                "{what}: the refusal does not say {word:?}\n{}",
                r.describe()
            );
            assert!(
                second.backups().is_empty(),
                "{what}: something was imported: {:?}",
                second.backups()
            );
        }

        // The real record, on standard input.
        let r = run_with_stdin(
            second.command(["backup", "import", "-", "--json"]),
            &format!("{record}\n"),
        )
        .assert_success();
        let imported: Value = serde_json::from_str(r.stdout.trim())
            .unwrap_or_else(|e| panic!("{e}\n{}", r.describe()));
        assert_eq!(json_str(&imported, "id"), bid);
        let list = second.backups();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(json_str(&list[0], "id"), bid);
        assert_eq!(json_str(&list[0], "state"), "available");
        assert_eq!(json_str(&list[0], "checksum"), json_str(&b, "checksum"));
        assert_eq!(json_str(&list[0], "volume_name"), "exported");

        // Twice: refused.
        let r = second.err(["backup", "import", &record]);
        assert!(r.stderr.contains("already"), "{}", r.describe());
        assert_eq!(second.backups().len(), 1);

        // Restoring from the second installation gives the data back.
        let r = restore_json(&second, &bid, &["--to", SILVER, "--verify"]);
        let restored = second.volume_img(SILVER, json_str(&r, "volume"));
        assert_same(&reference, &restored, size);
        // The first installation is unaffected.
        assert_eq!(json_str(&first.show_backup(&bid), "state"), "available");
    });
}

// 6. delete ------------------------------------------------------------------

#[test]
fn delete_backup_removes_its_volume_and_volume_delete_refuses_backup_volumes() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = Installation::new(s);
        let size = 16 * MIB;
        let id = inst.create_volume(GOLD, "src", size);
        create_file(
            inst.volume_img(GOLD, &id),
            size,
            &[Region::random(0, 2 * MIB, 3)],
        );
        let b = backup_json(&inst, &format!("{GOLD}/{id}"), &[]);
        let bid = json_str(&b, "id").to_owned();
        let tid = json_str(&b, "target_volume_id").to_owned();
        let (img, sidecar) = (inst.volume_img(VAULT, &tid), inst.volume_json(VAULT, &tid));
        assert!(img.is_file() && sidecar.is_file());

        for spec in [format!("{VAULT}/{tid}"), tid.clone()] {
            let r = inst.err(["volume", "delete", &spec]);
            assert!(
                r.stderr.contains("backup"),
                "the refusal does not say the volume holds a backup\n{}",
                r.describe()
            );
            assert!(
                img.is_file() && sidecar.is_file(),
                "{spec}: files removed anyway"
            );
        }
        assert_eq!(json_str(&inst.show_backup(&bid), "state"), "available");

        inst.ok(["backup", "delete", &bid]);
        assert!(!img.exists(), "{} is still there", img.display());
        assert!(!sidecar.exists(), "{} is still there", sidecar.display());
        assert!(
            dir_entries(inst.pool_dir(VAULT)).is_empty(),
            "{:?}",
            dir_entries(inst.pool_dir(VAULT))
        );
        assert!(inst.backups().is_empty(), "{:?}", inst.backups());
        assert_eq!(
            dir_entries(inst.pool_dir(GOLD)),
            vec![format!("volume-{id}.img"), format!("volume-{id}.json")],
            "the backup's snapshots were not all deleted with it"
        );
        let r = inst.err(["backup", "show", &bid]);
        assert!(r.stderr.contains(&bid), "{}", r.describe());
        let r = inst.err(["backup", "delete", &bid]);
        assert!(r.stderr.contains(&bid), "{}", r.describe());

        // The source is a plain volume again: it can be deleted.
        inst.ok(["volume", "delete", &format!("{GOLD}/{id}")]);
        assert!(dir_entries(inst.pool_dir(GOLD)).is_empty());
    });
}

// 7. bad configuration files -------------------------------------------------

#[test]
fn bad_configuration_files_are_refused_with_a_reason() {
    with_scratch(|s| {
        let inst = Installation::new(s);
        let good = installation_yaml("catalog.db", "");
        let duplicate = good.replacen("  - name: backup", "  - name: primary", 1);
        assert_ne!(duplicate, good);
        let cases: Vec<(&str, String, Vec<&str>)> = vec![
            (
                "YAML syntax error",
                good.replacen("gold: primary/gold", "gold: [primary/gold", 1),
                vec!["syntax"],
            ),
            (
                "unknown key",
                good.replacen("  catalog: catalog.db", "  catalgo: catalog.db", 1),
                vec!["catalgo", "unknown"],
            ),
            (
                "unknown key in a backend",
                good.replacen("    pools:\n      vault", "    pool:\n      vault", 1),
                vec!["`pool`", "unknown"],
            ),
            (
                "unknown driver",
                good.replacen("driver: file", "driver: ceph", 1),
                vec!["ceph", "driver"],
            ),
            (
                "missing pool directory",
                good.replacen("silver: primary/silver", "silver: primary/silverr", 1),
                vec!["silver", "primary/silverr"],
            ),
            (
                "default target names an unknown pool",
                good.replacen(
                    "default_target: backup:vault",
                    "default_target: backup:vualt",
                    1,
                ),
                vec!["vualt"],
            ),
            (
                "default target names an unknown backend",
                good.replacen(
                    "default_target: backup:vault",
                    "default_target: backpu:vault",
                    1,
                ),
                vec!["backpu"],
            ),
            (
                "duplicate backend names",
                duplicate,
                vec!["primary", "more than once"],
            ),
        ];
        for (i, (what, yaml, words)) in cases.iter().enumerate() {
            assert_ne!(yaml, &good, "{what}: the test case did not change the file");
            let config = s.join(format!("bad-{i}.yaml"));
            std::fs::write(&config, yaml).unwrap();
            let bad = Installation {
                dir: inst.dir.clone(),
                config,
            };
            for args in [&["check-config"][..], &["backup", "list"][..]] {
                let r = bad.err(args);
                for word in words {
                    assert!(
                        r.stderr.contains(word),
                        "{what}: the error does not mention {word:?}\n{}\n--- config ---\n{yaml}",
                        r.describe()
                    );
                }
            }
        }
        // No configuration file at all.
        let missing = Installation {
            dir: inst.dir.clone(),
            config: s.join("nonexistent.yaml"),
        };
        let r = missing.err(["check-config"]);
        assert!(r.stderr.contains("nonexistent.yaml"), "{}", r.describe());
        // The good one passes.
        inst.ok(["check-config"]);
    });
}

// 8. crash recovery -----------------------------------------------------------

/// A configuration over the same pools and catalog with a bandwidth limit,
/// so a copy of `size` bytes lasts `size / 8 MiB` seconds.
fn slow(inst: &Installation) -> Installation {
    inst.sibling("slow.yaml", "catalog.db", "  bwlimit: 8M\n")
}

/// A source volume on gold, fully written with random data; returns its id
/// and a copy of its content.
fn crash_source(s: &Scratch, inst: &Installation, size: u64) -> (String, std::path::PathBuf) {
    let id = inst.create_volume(GOLD, "crash-source", size);
    create_random_file(inst.volume_img(GOLD, &id), size, 0xC4A5);
    let reference = s.join("source.ref");
    create_random_file(&reference, size, 0xC4A5);
    (id, reference)
}

/// What must hold after volback died in the middle of a backup of `id`:
/// recovery finds the operation and undoes it, leaving no loop device,
/// snapshot or partial volume, the backup in state error, the source as it
/// was; a second recovery does nothing; a new backup works.
fn check_recovery(
    s: &Scratch,
    inst: &Installation,
    id: &str,
    reference: &Path,
    size: u64,
    min_resources: u64,
    what: &str,
) -> String {
    let list = inst.backups();
    assert_eq!(list.len(), 1, "{what}: {list:?}");
    let bid = json_str(&list[0], "id").to_owned();
    assert_ne!(
        json_str(&list[0], "state"),
        "available",
        "{what}: the interrupted backup is available: {list:?}"
    );

    let rec = inst.json(["recover", "--json"]);
    assert_eq!(json_u64(&rec, "operations"), 1, "{what}: {rec}");
    assert!(
        json_u64(&rec, "resources_removed") >= min_resources,
        "{what}: expected at least {min_resources} resources removed: {rec}"
    );
    assert_eq!(
        rec["backups_marked_error"],
        Value::Array(vec![Value::String(bid.clone())]),
        "{what}: {rec}"
    );
    assert_eq!(
        rec["backups_deleted"],
        Value::Array(vec![]),
        "{what}: {rec}"
    );

    assert_no_loop_devices(s.path());
    assert!(
        snapshot_files(inst).is_empty(),
        "{what}: snapshots left: {:?}",
        snapshot_files(inst)
    );
    assert!(
        dir_entries(inst.pool_dir(VAULT)).is_empty(),
        "{what}: the partial destination was not removed: {:?}",
        dir_entries(inst.pool_dir(VAULT))
    );
    assert_eq!(
        dir_entries(inst.pool_dir(GOLD)),
        vec![format!("volume-{id}.img"), format!("volume-{id}.json")],
        "{what}: gold pool"
    );
    let list = inst.backups();
    assert_eq!(list.len(), 1, "{what}: {list:?}");
    assert_eq!(json_str(&list[0], "id"), bid);
    assert_eq!(json_str(&list[0], "state"), "error", "{what}: {list:?}");
    assert_same(reference, inst.volume_img(GOLD, id), size);

    // Nothing more to do.
    let again = inst.json(["recover", "--json"]);
    assert_eq!(
        json_u64(&again, "operations"),
        0,
        "{what}: second recover: {again}"
    );
    assert_eq!(json_u64(&again, "resources_removed"), 0, "{what}: {again}");
    assert_eq!(
        again["backups_marked_error"],
        Value::Array(vec![]),
        "{what}: {again}"
    );
    assert_eq!(
        again["backups_deleted"],
        Value::Array(vec![]),
        "{what}: {again}"
    );

    // Usable again: a normal backup works.
    let b = backup_json(inst, &format!("{GOLD}/{id}"), &[]);
    assert_eq!(json_str(&b, "state"), "available", "{what}: {b}");
    let tid = json_str(&b, "target_volume_id");
    // The new backup's volume, and its restore point if it has one.
    let mut expected = vec![format!("volume-{tid}.img"), format!("volume-{tid}.json")];
    if let Some(snap) = b["target_snapshot_id"].as_str() {
        expected.push(format!("snapshot-{snap}.img"));
        expected.push(format!("snapshot-{snap}.json"));
    }
    expected.sort();
    assert_eq!(
        dir_entries(inst.pool_dir(VAULT)),
        expected,
        "{what}: vault after a new backup"
    );
    assert_backup_data(inst, &b, reference, size);
    assert_no_stray_snapshots(inst, what);
    assert_no_loop_devices(s.path());
    bid
}

/// Backs up a fresh volume with `FAILPOINTS=<point>=return` and checks the
/// crash and the recovery.
fn crash_at(point: &str, snapshot: bool, min_resources: u64) {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = Installation::new(s);
        let size = 16 * MIB;
        let (id, reference) = crash_source(s, &inst, size);
        // copy_half_done fires from the progress callback (every 200 ms):
        // the copy must last a while.
        let runner = if point == "copy_half_done" {
            slow(&inst)
        } else {
            inst.clone()
        };
        let spec = format!("{GOLD}/{id}");
        let mut args = vec!["backup", "create", spec.as_str(), "--progress", "none"];
        if snapshot {
            args.push("--snapshot");
        }
        let mut cmd = runner.command(&args);
        cmd.env("FAILPOINTS", format!("{point}=return"));
        let r = run(cmd);
        assert!(
            !r.success(),
            "{point}: volback did not die (is the binary built with \
             --features volback-engine/failpoints?)\n{}",
            r.describe()
        );
        assert_eq!(
            r.status().signal(),
            Some(libc::SIGABRT),
            "{point}: expected an abort at the fail point\n{}",
            r.describe()
        );
        assert!(r.stderr.contains(point), "{point}\n{}", r.describe());
        check_recovery(s, &inst, &id, &reference, size, min_resources, point);
    });
}

#[test]
fn crash_at_backup_start() {
    crash_at("backup_start", false, 0);
}

#[test]
fn crash_after_snapshot() {
    // The snapshot.
    crash_at("backup_after_snapshot", true, 1);
}

#[test]
fn crash_before_copy() {
    // The destination volume and the two exports.
    crash_at("backup_before_copy", false, 3);
}

#[test]
fn crash_half_way_through_the_copy() {
    crash_at("copy_half_done", false, 3);
}

#[test]
fn crash_after_copy() {
    crash_at("backup_after_copy", false, 3);
}

/// Spawns `cmd` (a backup or restore with `--progress json` under a
/// bandwidth limit), waits for a progress line showing the copy under way,
/// and kills it with SIGKILL.
fn kill_mid_copy(s: &Scratch, mut cmd: std::process::Command, what: &str) {
    let stderr_file = s.join(format!("{what}.stderr"));
    cmd.stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_file).unwrap());
    let mut child = ChildGuard(cmd.spawn().expect("spawning volback"));
    let stdout = child.0.stdout.take().expect("piped stdout");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("reading volback's stdout");
        seen.push(line.clone());
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v["event"] == "progress" && v["done"].as_u64().unwrap_or(0) > 0 {
            let total = json_u64(&v, "total");
            assert!(
                json_u64(&v, "done") < total,
                "{what}: the copy finished before it could be killed: {line}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{what}: no progress: {seen:?}");
    }
    child.0.kill().expect("SIGKILL");
    let status = child.0.wait().expect("reaping volback");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{what}: volback was not killed mid-copy (status {status}); stdout: {seen:?}; stderr: {}",
        std::fs::read_to_string(&stderr_file).unwrap_or_default()
    );
}

#[test]
fn kill_9_during_the_copy() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = Installation::new(s);
        let size = 32 * MIB;
        let (id, reference) = crash_source(s, &inst, size);
        let spec = format!("{GOLD}/{id}");
        let cmd = slow(&inst).command(["backup", "create", spec.as_str(), "--progress", "json"]);
        kill_mid_copy(s, cmd, "backup");
        check_recovery(s, &inst, &id, &reference, size, 3, "kill -9");
    });
}

/// Not in the brief's list, but the same promise: a restore killed half
/// way is undone (a new volume removed, an existing one kept), and the
/// backup is available again.
#[test]
fn kill_9_during_a_restore() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = Installation::new(s);
        let size = 32 * MIB;
        let (id, reference) = crash_source(s, &inst, size);
        let b = backup_json(&inst, &format!("{GOLD}/{id}"), &[]);
        let bid = json_str(&b, "id").to_owned();
        let data = inst.volume_img(VAULT, json_str(&b, "target_volume_id"));

        // To a new volume.
        let cmd = slow(&inst).command(["restore", &bid, "--to", SILVER, "--progress", "json"]);
        kill_mid_copy(s, cmd, "restore-new");
        assert_ne!(json_str(&inst.show_backup(&bid), "state"), "available");
        let rec = inst.json(["recover", "--json"]);
        assert_eq!(json_u64(&rec, "operations"), 1, "{rec}");
        assert!(json_u64(&rec, "resources_removed") >= 3, "{rec}");
        assert_eq!(rec["backups_marked_error"], Value::Array(vec![]), "{rec}");
        assert_no_loop_devices(s.path());
        assert!(
            dir_entries(inst.pool_dir(SILVER)).is_empty(),
            "the partially restored volume was not removed: {:?}",
            dir_entries(inst.pool_dir(SILVER))
        );
        assert_eq!(json_str(&inst.show_backup(&bid), "state"), "available");
        assert_same(&reference, &data, size);

        // Onto an existing volume: it stays (partly overwritten).
        let existing = inst.create_volume(SILVER, "existing", size);
        let existing_img = inst.volume_img(SILVER, &existing);
        create_filled_file(&existing_img, size, 0xAB);
        let spec = format!("{SILVER}/{existing}");
        let cmd = slow(&inst).command([
            "restore",
            &bid,
            "--volume",
            &spec,
            "--force",
            "--progress",
            "json",
        ]);
        kill_mid_copy(s, cmd, "restore-existing");
        let rec = inst.json(["recover", "--json"]);
        assert_eq!(json_u64(&rec, "operations"), 1, "{rec}");
        assert_no_loop_devices(s.path());
        assert!(
            existing_img.is_file() && inst.volume_json(SILVER, &existing).is_file(),
            "recovery deleted the existing volume a restore was writing to"
        );
        assert_eq!(file_size(&existing_img), size);
        assert_eq!(json_str(&inst.show_backup(&bid), "state"), "available");

        // Both restores work now.
        restore_json(&inst, &bid, &["--volume", &spec, "--force"]);
        assert_same(&reference, &existing_img, size);
        let r = restore_json(&inst, &bid, &["--to", SILVER]);
        assert_same(
            &reference,
            inst.volume_img(SILVER, json_str(&r, "volume")),
            size,
        );
        assert_eq!(volumes_in(&inst, SILVER).len(), 2);
        assert_no_stray_snapshots(&inst, "after the killed restores");
        assert_backup_data(&inst, &inst.show_backup(&bid), &reference, size);
    });
}

#[test]
fn error_backup_can_be_deleted_after_recovery() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = Installation::new(s);
        let size = 16 * MIB;
        let (id, _) = crash_source(s, &inst, size);
        let mut cmd = inst.command(["backup", "create", &format!("{GOLD}/{id}")]);
        cmd.env("FAILPOINTS", "backup_before_copy=return");
        let r = run(cmd);
        assert!(!r.success(), "{}", r.describe());
        inst.ok(["recover"]);
        let list = inst.backups();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(json_str(&list[0], "state"), "error", "{list:?}");
        let bid = json_str(&list[0], "id").to_owned();
        inst.ok(["backup", "delete", &bid]);
        assert!(inst.backups().is_empty(), "{:?}", inst.backups());
        assert!(dir_entries(inst.pool_dir(VAULT)).is_empty());
        assert_no_loop_devices(s.path());
    });
}

// 9. volume commands ---------------------------------------------------------

#[test]
fn volume_create_list_attach_detach_delete() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = Installation::new(s);
        let size = 16 * MIB;

        // Text output: BACKEND:POOL/ID.
        let r = inst.ok([
            "volume", "create", SILVER, "--size", "16M", "--name", "vol-a",
        ]);
        let printed = r.stdout.trim();
        let a = printed
            .strip_prefix("primary:silver/")
            .unwrap_or_else(|| panic!("volume create printed {printed:?}"))
            .to_owned();
        assert!(inst.volume_img(SILVER, &a).is_file());
        assert!(inst.volume_json(SILVER, &a).is_file());
        assert_eq!(file_size(inst.volume_img(SILVER, &a)), size);
        assert_eq!(
            allocated_bytes(inst.volume_img(SILVER, &a)),
            0,
            "not sparse"
        );

        let v = inst.json([
            "volume", "create", VAULT, "--size", "8M", "--name", "vol-b", "--json",
        ]);
        assert_eq!(json_str(&v, "backend"), "backup", "{v}");
        let b = json_str(&v["volume"], "id").to_owned();
        assert_eq!(json_str(&v["volume"], "name"), "vol-b", "{v}");
        assert_eq!(json_str(&v["volume"], "pool"), "vault", "{v}");
        assert_eq!(json_u64(&v["volume"], "size"), 8 * MIB, "{v}");

        // Listing: all, and per pool.
        let all = inst.json(["volume", "list", "--json"]);
        let all = all.as_array().expect("array");
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all.iter().any(|e| e["backend"] == "primary"
            && e["volume"]["id"] == a.as_str()
            && e["volume"]["name"] == "vol-a"
            && e["volume"]["size"] == size));
        assert!(all
            .iter()
            .any(|e| e["backend"] == "backup" && e["volume"]["id"] == b.as_str()));
        assert_eq!(
            volumes_in(&inst, SILVER),
            vec![(a.clone(), "vol-a".to_owned(), size)]
        );
        assert!(volumes_in(&inst, GOLD).is_empty());
        let text = inst.ok(["volume", "list"]).stdout;
        assert!(
            text.contains(&a) && text.contains("vol-a") && text.contains("vol-b"),
            "{text}"
        );

        // Attach, write through the device, detach.
        let img = inst.volume_img(SILVER, &a);
        {
            let attached = inst.attach(SILVER, &a);
            let dev = attached.path().to_path_buf();
            assert!(dev.starts_with("/dev/"), "{}", dev.display());
            assert!(
                attached.still_attached(),
                "{} is not on {}",
                dev.display(),
                img.display()
            );
            assert_eq!(file_size(&dev), size);
            let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
            let regions = [Region::random(MIB, 3 * MIB, 9)];
            write_regions(&f, &regions);
            f.sync_all().unwrap();
            drop(f);
            // The text form prints the device path (another device).
            let r = inst.ok(["volume", "attach", &a]);
            let second = r.stdout.trim().to_owned();
            assert!(second.starts_with("/dev/loop"), "{}", r.describe());
            assert_eq!(loop_backing_file(&second).as_deref(), Some(img.as_path()));

            // Deleting an attached volume is refused.
            let r = inst.err(["volume", "delete", &format!("{SILVER}/{a}")]);
            assert!(
                r.stderr.contains("attached") || r.stderr.contains("use"),
                "{}",
                r.describe()
            );
            assert!(img.is_file());

            inst.ok(["volume", "detach", &format!("{SILVER}/{a}")]);
            assert!(!attached.still_attached());
            assert!(
                loop_devices_referencing(&img).is_empty(),
                "detach left devices: {:?}",
                loop_devices_referencing(&img)
            );
            let expected = s.join("expected");
            create_file(&expected, size, &regions);
            assert_same(&expected, &img, size);
        }

        // Delete, by spec and by bare id.
        inst.ok(["volume", "delete", &format!("{SILVER}/{a}")]);
        assert!(!img.exists() && !inst.volume_json(SILVER, &a).exists());
        inst.ok(["volume", "delete", &b]);
        assert!(dir_entries(inst.pool_dir(VAULT)).is_empty());
        assert_eq!(
            inst.json(["volume", "list", "--json"]),
            Value::Array(vec![])
        );

        // Unknown volumes: the error names them.
        let unknown = "00000000-0000-4000-8000-000000000000";
        let r = inst.err(["volume", "delete", unknown]);
        assert!(r.stderr.contains(unknown), "{}", r.describe());
        let r = inst.err(["volume", "delete", &format!("{GOLD}/{unknown}")]);
        assert!(r.stderr.contains(unknown), "{}", r.describe());
        let r = inst.err(["volume", "delete", &format!("{SILVER}/{a}")]);
        assert!(r.stderr.contains(&a), "{}", r.describe());
    });
}
