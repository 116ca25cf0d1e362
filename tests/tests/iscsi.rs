//! The `tgt` volume driver and the iSCSI connector through the `volback`
//! CLI, each test against a tgtd of its own ([`TgtDaemon`]: installed and
//! started by fixtures/tgt.sh, stopped by PID on drop; never skipped).
//! libiscsi (through `qemu-img` with qemu's iscsi driver) is the reference
//! initiator the data is checked against.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use volback_tests::*;

const SIZE: u64 = 32 * MIB;

/// An installation with a tgt array (pools `array:gold`, `array:silver`)
/// and a file vault (`backup:vault`, the default target). `options` are
/// extra tgt options (`, chap: {...}`), `backup_extra` lines of `backup:`.
fn installation(s: &Scratch, tgt: &TgtDaemon, options: &str, backup_extra: &str) -> Installation {
    for dir in ["array/gold", "array/silver", "backup/vault"] {
        std::fs::create_dir_all(s.join(dir)).unwrap();
    }
    let config = s.join("volback.yaml");
    std::fs::write(
        &config,
        format!(
            "backends:
  - name: array
    driver: tgt
    options: {{portal: \"{}\", control_port: {}{options}}}
    pools: {{gold: array/gold, silver: array/silver}}
  - name: backup
    driver: file
    pools: {{vault: backup/vault}}
backup:
  default_target: backup:vault
  catalog: catalog.db
{backup_extra}",
            tgt.portal, tgt.control_port
        ),
    )
    .unwrap();
    Installation {
        dir: s.path().to_path_buf(),
        config,
    }
}

/// Data islands with holes between them (about 5 MiB of 32).
fn islands() -> Vec<Region> {
    vec![
        Region::random(0, MIB, 1),
        Region::random(5 * MIB + 4 * KIB, 300_000, 2),
        Region::random(17 * MIB, 3 * MIB, 3),
        Region::random(SIZE - 64 * KIB, 64 * KIB, 4),
    ]
}

/// A volume on `pool` with [`islands`] written into its image.
fn volume_with_data(inst: &Installation, pool: &str) -> (String, PathBuf) {
    let id = inst.create_volume(pool, "lun-data", SIZE);
    let img = inst.volume_img(pool, &id);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    write_regions(&f, &islands());
    f.sync_all().unwrap();
    (id, img)
}

fn backup(inst: &Installation, volume: &str) -> Value {
    let b = inst.json(["backup", "create", volume, "--json"]);
    assert_eq!(json_str(&b, "state"), "available", "{b}");
    b
}

fn vault_img(inst: &Installation, b: &Value) -> PathBuf {
    inst.volume_img("backup:vault", json_str(b, "target_volume_id"))
}

/// A full backup of a tgt volume (read through volback's initiator) onto a
/// file pool, restored onto a new tgt volume and onto an existing one
/// (written through the initiator), every copy compared byte for byte.
/// The LUN is thin, so the backup reads only the allocated islands.
#[test]
fn tgt_volume_backup_to_file_pool_and_restore_onto_tgt() {
    let tgt = TgtDaemon::start();
    with_scratch(|s| {
        let inst = installation(s, &tgt, "", "");
        inst.ok(["check-config"]);
        let (id, img) = volume_with_data(&inst, "array:gold");

        let b = backup(&inst, &format!("array:gold/{id}"));
        assert_same(&img, vault_img(&inst, &b), SIZE);
        let read = json_u64(&b, "bytes_read");
        assert!(
            read < SIZE / 2,
            "the thin LUN's holes were read ({read} bytes of {SIZE}): {b}"
        );
        assert!(tgt.target_ids().is_empty(), "exports left: {}", tgt.show());

        // To a new volume on the array.
        let r = inst.json([
            "restore",
            json_str(&b, "id"),
            "--to",
            "array:silver",
            "--verify",
            "--json",
        ]);
        let restored = json_str(&r, "volume").to_owned();
        assert_same(&img, inst.volume_img("array:silver", &restored), SIZE);

        // Onto an existing volume full of other data.
        let other = inst.create_volume("array:silver", "stale", SIZE);
        let other_img = inst.volume_img("array:silver", &other);
        create_file(&other_img, SIZE, &[Region::byte(0, SIZE, 0x5a)]);
        inst.ok([
            "restore",
            json_str(&b, "id"),
            "--volume",
            &format!("array:silver/{other}"),
            "--force",
            "--verify",
        ]);
        assert_same(&img, &other_img, SIZE);
        assert!(tgt.target_ids().is_empty(), "exports left: {}", tgt.show());
    });
}

/// `qemu-img convert` through libiscsi (qemu's iscsi block driver).
fn qemu_img(args: &[&str]) -> Run {
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    run(cmd).assert_success()
}

/// `volback copy` to and from `iscsi://` URLs, checked against libiscsi:
/// what volback writes, libiscsi reads back; what libiscsi writes, volback
/// reads back; and both see the same capacity.
#[test]
fn copy_through_iscsi_urls_agrees_with_libiscsi() {
    let tgt = TgtDaemon::start();
    with_scratch(|s| {
        let lun = s.join("lun.img");
        create_sparse_file(&lun, SIZE);
        let iqn = tgt.add_target(1, &lun);
        let url = tgt.url(&iqn, 1);

        let cap = run({
            let mut c = Command::new("iscsi-readcapacity16");
            c.arg(&url);
            c
        })
        .assert_success();
        assert!(
            cap.stdout.contains(&format!("{}", SIZE / 512 - 1)),
            "libiscsi sees another size: {}",
            cap.stdout
        );

        // volback writes, libiscsi reads.
        let source = s.join("source.img");
        create_file(&source, SIZE, &islands());
        volback_ok([
            "copy",
            &arg(&source),
            &url,
            "--verify",
            "--progress",
            "none",
        ]);
        let by_libiscsi = s.join("by-libiscsi.img");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            &arg(&by_libiscsi),
        ]);
        assert_same(&source, &by_libiscsi, SIZE);
        assert_same(&source, &lun, SIZE);

        // libiscsi writes, volback reads.
        let second = s.join("second.img");
        create_random_file(&second, SIZE, 77);
        qemu_img(&[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            &arg(&second),
            &url,
        ]);
        let by_volback = s.join("by-volback.img");
        volback_ok([
            "copy",
            &url,
            &arg(&by_volback),
            "--verify",
            "--progress",
            "none",
        ]);
        assert_same(&second, &by_volback, SIZE);
    });
}

/// A wrong CHAP password in a URL fails the login with an authentication
/// error that never shows the password; the right one works.
#[test]
fn chap_password_in_url_right_and_wrong() {
    let tgt = TgtDaemon::start();
    with_scratch(|s| {
        let lun = s.join("lun.img");
        create_file(&lun, SIZE, &islands());
        let iqn = tgt.add_target(1, &lun);
        tgt.tgtadm(&[
            "--mode",
            "account",
            "--op",
            "new",
            "--user",
            "backup",
            "--password",
            "s3cret-Passw0rd",
        ]);
        tgt.tgtadm(&[
            "--mode", "account", "--op", "bind", "--tid", "1", "--user", "backup",
        ]);
        let url = |password: &str| format!("iscsi://backup%{password}@{}/{iqn}/1", tgt.portal);
        let out = s.join("out.img");
        let r = volback_err([
            "copy",
            &url("wr0ng-Passw0rd"),
            &arg(&out),
            "--progress",
            "none",
        ]);
        let text = format!("{}{}", r.stdout, r.stderr);
        assert!(
            text.to_lowercase().contains("authentication"),
            "not an authentication error: {}",
            r.describe()
        );
        assert!(
            !text.contains("wr0ng-Passw0rd"),
            "the password leaked: {text}"
        );
        // No login at all: nothing read.
        let r = volback_err(["copy", &tgt.url(&iqn, 1), &arg(&out), "--progress", "none"]);
        assert!(r.stderr.to_lowercase().contains("auth"), "{}", r.describe());

        // The summaries name the LUN without the password, as text and
        // as JSON.
        for progress in ["none", "json"] {
            let r = volback_ok([
                "copy",
                &url("s3cret-Passw0rd"),
                &arg(&out),
                "--verify",
                "--progress",
                progress,
            ]);
            assert_same(&lun, &out, SIZE);
            let r2 = volback_ok(["read", &url("s3cret-Passw0rd"), "--progress", progress]);
            for r in [r, r2] {
                let text = format!("{}{}", r.stdout, r.stderr);
                assert!(text.contains(&format!("backup@{}", tgt.portal)), "{text}");
                assert!(!text.contains("s3cret"), "the password leaked: {text}");
            }
        }
    });
}

fn secret_file(s: &Scratch, name: &str, secret: &str) -> PathBuf {
    let p = s.join(name);
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    p
}

/// A tgt backend exporting with CHAP, then with mutual CHAP: backups and
/// restores work through the credentials, which stay in their files (the
/// connection info and the output name the files, never the secrets).
#[test]
fn tgt_backend_with_chap_and_mutual_chap() {
    let tgt = TgtDaemon::start();
    with_scratch(|s| {
        let secret = "InitiatorSecret-123";
        let target_secret = "TargetSecret-4567";
        let ini = secret_file(s, "chap.secret", secret);
        let tgt_file = secret_file(s, "mutual.secret", target_secret);
        for mutual in [false, true] {
            let mut options = format!(", chap: {{user: volback, secret_file: {}}}", arg(&ini));
            if mutual {
                options += &format!(
                    ", mutual_chap: {{user: array, secret_file: {}}}",
                    arg(&tgt_file)
                );
            }
            let inst = installation(s, &tgt, &options, "");
            let (id, img) = volume_with_data(&inst, "array:gold");
            let volume = format!("array:gold/{id}");
            let run = inst.run(["backup", "create", &volume, "--json"]);
            let text = format!("{}{}", run.stdout, run.stderr);
            assert!(
                !text.contains(secret) && !text.contains(target_secret),
                "a secret leaked: {text}"
            );
            let b: Value = serde_json::from_str(run.assert_success().stdout.trim()).unwrap();
            assert_same(&img, vault_img(&inst, &b), SIZE);
            let r = inst.json([
                "restore",
                json_str(&b, "id"),
                "--to",
                "array:silver",
                "--verify",
                "--json",
            ]);
            let restored = inst.volume_img("array:silver", json_str(&r, "volume"));
            assert_same(&img, &restored, SIZE);
            inst.ok(["backup", "delete", json_str(&b, "id")]);
            assert!(tgt.target_ids().is_empty(), "exports left: {}", tgt.show());
        }
    });
}

/// Spawns `cmd` with `--progress json` output on stdout and returns once a
/// progress line shows some data moved (the child keeps running).
fn spawn_until_under_way(
    mut cmd: Command,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning volback");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut line = String::new();
    let why = loop {
        line.clear();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            break "volback ended before the copy got under way";
        }
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if v.get("done").and_then(Value::as_u64).unwrap_or(0) > 0 {
                return (child, out);
            }
        }
        if Instant::now() >= deadline {
            break "no progress within 60 s";
        }
    };
    let _ = child.kill();
    let status = child.wait();
    panic!("{why} ({status:?})");
}

/// The target drops the connection in the middle of a copy: the initiator
/// reconnects, logs in again, reissues what was in flight, and the copy
/// completes and verifies, with nothing seen by the caller.
#[test]
fn connection_dropped_mid_copy_still_completes() {
    let tgt = TgtDaemon::start();
    with_scratch(|s| {
        let lun = s.join("lun.img");
        create_random_file(&lun, SIZE, 9);
        let iqn = tgt.add_target(1, &lun);
        let out = s.join("out.img");
        let mut cmd = volback_command(["copy", &tgt.url(&iqn, 1), &arg(&out)]);
        cmd.args(["--verify", "--progress", "json", "--bwlimit", "8M"]);
        cmd.args(["--block-size", "256K", "--queue-depth", "4"]);
        let (mut child, _out) = spawn_until_under_way(cmd);
        let mut dropped = 0;
        for _ in 0..3 {
            dropped += tgt.drop_connections(1);
            std::thread::sleep(Duration::from_millis(700));
        }
        assert!(dropped > 0, "no connection to drop: {}", tgt.show());
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(status.success(), "the copy failed: {stderr}");
        assert_same(&lun, &out, SIZE);
    });
}

/// The LUN a backup reads disappears half way: the backup fails with an
/// error naming the device, is recorded as error (never available), and
/// leaves no volume, export or snapshot behind.
#[test]
fn lun_that_disappears_mid_backup_fails_cleanly() {
    let tgt = TgtDaemon::start();
    with_scratch(|s| {
        let inst = installation(s, &tgt, "", "  bwlimit: 8M\n");
        let id = inst.create_volume("array:gold", "vanishing", SIZE);
        create_random_file(inst.volume_img("array:gold", &id), SIZE, 5);
        let volume = format!("array:gold/{id}");
        let cmd = inst.command(["backup", "create", &volume, "--progress", "json"]);
        let (mut child, _out) = spawn_until_under_way(cmd);
        let tids = tgt.target_ids();
        assert_eq!(tids.len(), 1, "{}", tgt.show());
        let t = tids[0].to_string();
        tgt.tgtadm(&["--mode", "target", "--op", "delete", "--force", "--tid", &t]);
        let started = Instant::now();
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "the backup succeeded without its LUN");
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "took {:?} to give up",
            started.elapsed()
        );
        assert!(
            stderr.contains("iscsi://"),
            "the error names no device: {stderr}"
        );

        let list = inst.backups();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(json_str(&list[0], "state"), "error", "{list:?}");
        let vault: Vec<_> = std::fs::read_dir(s.join("backup/vault"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(vault.is_empty(), "left in the vault: {vault:?}");
        let gold: Vec<String> = std::fs::read_dir(s.join("array/gold"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(&format!("volume-{id}")))
            .collect();
        assert!(gold.is_empty(), "snapshots left: {gold:?}");
        assert!(tgt.target_ids().is_empty(), "exports left: {}", tgt.show());
    });
}
