//! `volback demo`: the embedded default, end to end, with no external
//! service. Two file pools under a scratch directory, a volume holding a
//! real ext4 filesystem with files, a backup to the other pool, a restore
//! to a new volume, and a check of the restored filesystem (fsck and a
//! file-by-file comparison).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::{Config, PoolRef};
use crate::service::{BackupRequest, RestoreTarget, Service};
use crate::units::human;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo: {0}")]
    Step(String),
    #[error("demo: {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn step(msg: impl std::fmt::Display) {
    println!("==> {msg}");
}

fn sh(what: &str, cmd: &mut Command) -> Result<String, DemoError> {
    let out = cmd.output().map_err(|source| DemoError::Io {
        what: what.into(),
        source,
    })?;
    if !out.status.success() {
        return Err(DemoError::Step(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Unmounts, detaches and removes whatever the demo set up, even when a
/// step failed half way.
struct Scratch {
    dir: PathBuf,
    keep: bool,
    mounts: Vec<PathBuf>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg(&m).status();
        }
        // Any loop device still backed by a file of ours is detached.
        for entry in walk(&self.dir) {
            if let Ok(devs) = volback_drivers::loopdev::find_attached(&entry) {
                for d in devs {
                    let _ = volback_drivers::loopdev::detach_path(&d);
                }
            }
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Every regular file under `root` with its content.
fn capture(root: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>, DemoError> {
    let mut out = BTreeMap::new();
    for f in walk(root) {
        if f.components().any(|c| c.as_os_str() == "lost+found") {
            continue;
        }
        let data = std::fs::read(&f).map_err(|source| DemoError::Io {
            what: format!("reading {}", f.display()),
            source,
        })?;
        out.insert(
            f.strip_prefix(root).expect("under the root").to_path_buf(),
            data,
        );
    }
    Ok(out)
}

fn describe(b: &crate::catalog::BackupRecord) {
    let how = match (b.mode.as_str(), b.change_tracking.as_str()) {
        ("incremental", "driver") => {
            "incremental, changes from the driver's change tracking".to_string()
        }
        ("incremental", _) => "incremental, changes found by comparing block hashes".to_string(),
        _ => "full".to_string(),
    };
    println!(
        "    backup {} is {} ({how}): read {}, wrote {} of a {} volume",
        b.id,
        b.state.as_str(),
        human(b.bytes_read),
        human(b.bytes_written),
        human(b.volume_size)
    );
}

/// Restores a backup to a new volume on primary:silver (verified against
/// the backup's checksum map), runs fsck on it, mounts it and compares
/// every file with `expected`.
fn check_restore(
    svc: &mut Service,
    backup: &str,
    name: &str,
    expected: &BTreeMap<PathBuf, Vec<u8>>,
    dir: &Path,
    scratch: &mut Scratch,
) -> Result<(), DemoError> {
    let err = |e: crate::service::ServiceError| DemoError::Step(e.to_string());
    let silver = PoolRef {
        backend: "primary".into(),
        pool: "silver".into(),
    };
    let target = RestoreTarget::New {
        pool: Some(silver),
        name: Some(name.into()),
    };
    let restored = svc
        .restore(backup, &target, true, &mut |_| {})
        .map_err(err)?;
    println!(
        "    restored to primary:silver/{} in {:.2} s, read back and checked against the checksum map",
        restored.volume.id,
        restored.report.elapsed.as_secs_f64()
    );
    let (_, conn) = svc.attach_volume(&restored.volume.id).map_err(err)?;
    let dev = conn.properties.get("path").cloned().unwrap_or_default();
    sh(
        "fsck.ext4",
        Command::new("fsck.ext4").args(["-f", "-n", &dev]),
    )?;
    println!("    fsck.ext4 -f -n: clean");
    let mnt = dir.join("mnt/restored");
    sh(
        "mount",
        Command::new("mount").args(["-o", "ro"]).arg(&dev).arg(&mnt),
    )?;
    scratch.mounts.push(mnt.clone());
    let got = capture(&mnt)?;
    sh("umount", Command::new("umount").arg(&mnt))?;
    scratch.mounts.pop();
    svc.detach_volume(&restored.volume.id).map_err(err)?;
    if let Some(f) = expected.keys().find(|f| got.get(*f) != expected.get(*f)) {
        return Err(DemoError::Step(format!(
            "restored file {} differs from the original",
            f.display()
        )));
    }
    if let Some(f) = got.keys().find(|f| !expected.contains_key(*f)) {
        return Err(DemoError::Step(format!(
            "restored volume has a file the original did not: {}",
            f.display()
        )));
    }
    println!("    all {} files identical", expected.len());
    Ok(())
}

/// Deterministic pseudo-random bytes (splitmix64), so the demo's files are
/// real data that does not compress to zeroes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn run(dir: Option<PathBuf>, keep: bool, size: u64) -> Result<(), DemoError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| DemoError::Io { what, source }
    };
    let dir = dir
        .unwrap_or_else(|| PathBuf::from(format!("/var/tmp/volback-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir).map_err(io("creating the scratch directory"))?;
    let dir = dir
        .canonicalize()
        .map_err(io("resolving the scratch directory"))?;
    let mut scratch = Scratch {
        dir: dir.clone(),
        keep,
        mounts: Vec::new(),
    };

    step(format!("setting up two file pools under {}", dir.display()));
    for p in [
        "primary/gold",
        "primary/silver",
        "backup/vault",
        "mnt/source",
        "mnt/restored",
    ] {
        std::fs::create_dir_all(dir.join(p)).map_err(io("creating pool directories"))?;
    }
    let config_path = dir.join("volback.yaml");
    std::fs::write(
        &config_path,
        "backends:\n  - name: primary\n    driver: file\n    pools:\n      gold: primary/gold\n      silver: primary/silver\n\
         \x20 - name: backup\n    driver: file\n    pools:\n      vault: backup/vault\n\
         backup:\n  default_target: backup:vault\n  catalog: catalog.db\n",
    )
    .map_err(io("writing the configuration"))?;
    let loaded = Config::load(&config_path).map_err(|e| DemoError::Step(e.to_string()))?;
    let mut svc = Service::new(loaded).map_err(|e| DemoError::Step(e.to_string()))?;
    let err = |e: crate::service::ServiceError| DemoError::Step(e.to_string());

    step(format!(
        "creating a {} volume on primary:gold with an ext4 filesystem",
        human(size)
    ));
    let gold = PoolRef {
        backend: "primary".into(),
        pool: "gold".into(),
    };
    let vol = svc.create_volume(&gold, "demo-data", size).map_err(err)?;
    let (_, conn) = svc.attach_volume(&vol.id).map_err(err)?;
    let dev = conn.properties.get("path").cloned().unwrap_or_default();
    sh(
        "mkfs.ext4",
        Command::new("mkfs.ext4").args(["-q", "-F", &dev]),
    )?;
    let src_mnt = dir.join("mnt/source");
    sh("mount", Command::new("mount").arg(&dev).arg(&src_mnt))?;
    scratch.mounts.push(src_mnt.clone());
    for i in 0..24u64 {
        let sub = src_mnt.join(format!("dir{}", i % 4));
        std::fs::create_dir_all(&sub).map_err(io("creating directories"))?;
        let len = 1000 + (i as usize * 37_337) % (3 << 20);
        std::fs::write(sub.join(format!("file{i}.bin")), pattern(i, len))
            .map_err(io("writing files"))?;
    }
    std::fs::write(
        src_mnt.join("README.txt"),
        "volback demo: this filesystem was backed up and restored\n",
    )
    .map_err(io("writing files"))?;
    let first = capture(&src_mnt)?;
    sh("umount", Command::new("umount").arg(&src_mnt))?;
    scratch.mounts.pop();
    svc.detach_volume(&vol.id).map_err(err)?;
    println!(
        "    wrote {} files; volume primary:gold/{}",
        first.len(),
        vol.id
    );

    step("backing the volume up to backup:vault (generic path: export, attach, copy, detach, snapshot)");
    let request = |incremental| BackupRequest {
        volume: vol.id.clone(),
        target: None,
        snapshot: false,
        incremental,
        parent: None,
        generic: false,
    };
    let full = svc.backup(&request(false), &mut |_| {}).map_err(err)?;
    describe(&full);

    step("restoring it to a new volume on primary:silver, verified; fsck; every file compared");
    check_restore(
        &mut svc,
        &full.id,
        "demo-restored",
        &first,
        &dir,
        &mut scratch,
    )?;

    step("changing the filesystem: two files rewritten, one added, one removed");
    let (_, conn) = svc.attach_volume(&vol.id).map_err(err)?;
    let dev = conn.properties.get("path").cloned().unwrap_or_default();
    sh("mount", Command::new("mount").arg(&dev).arg(&src_mnt))?;
    scratch.mounts.push(src_mnt.clone());
    std::fs::write(src_mnt.join("dir1/file5.bin"), pattern(105, 700_000))
        .map_err(io("rewriting a file"))?;
    std::fs::write(src_mnt.join("dir2/file6.bin"), pattern(106, 5000))
        .map_err(io("rewriting a file"))?;
    std::fs::write(src_mnt.join("dir3/new.bin"), pattern(200, 1 << 20))
        .map_err(io("adding a file"))?;
    std::fs::remove_file(src_mnt.join("dir0/file0.bin")).map_err(io("removing a file"))?;
    let second = capture(&src_mnt)?;
    sh("umount", Command::new("umount").arg(&src_mnt))?;
    scratch.mounts.pop();
    svc.detach_volume(&vol.id).map_err(err)?;

    step("incremental backup: only the blocks that changed are written");
    let incremental = svc.backup(&request(true), &mut |_| {}).map_err(err)?;
    describe(&incremental);

    step("restoring the incremental backup and checking it");
    check_restore(
        &mut svc,
        &incremental.id,
        "demo-restored-2",
        &second,
        &dir,
        &mut scratch,
    )?;

    step("the first backup is still a complete restore point: verifying it");
    let v = svc.verify_backup(&full.id, &mut |_| {}).map_err(err)?;
    println!(
        "    backup {} matches its checksum map ({} read)",
        v.backup,
        human(v.bytes)
    );

    step("done");
    if keep {
        println!(
            "    kept {} (config: {})",
            dir.display(),
            config_path.display()
        );
    } else {
        println!("    removed {}", dir.display());
    }
    Ok(())
}
