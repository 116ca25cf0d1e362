//! The `file` volume driver: pools are directories, volumes are sparse raw
//! image files in them.
//!
//! A pool directory holds, per volume, `volume-<id>.img` (the data) and
//! `volume-<id>.json` (its sidecar: id, name, size, metadata, creation
//! time), and per snapshot `snapshot-<id>.img` and `snapshot-<id>.json`.
//! The sidecar is written last on create and removed last on delete, so
//! after a crash an image without a sidecar is an unfinished create and a
//! sidecar without an image an unfinished delete. Listing skips both with a
//! warning; deleting the id again (what the engine's recovery does) removes
//! what is left.
//!
//! Snapshots are full point-in-time copies (a reflink where the file system
//! can share extents, else a sparse copy), independent of their volume:
//! either can be deleted first. Two reflinked snapshots of one volume share
//! every block not rewritten between them, which is how the driver tells
//! what changed between them (see `changes`).
//!
//! Exports hand out the image path for the local connector, or attach a
//! loop device to it. A loop device is the only "use" this driver can see:
//! [`VolumeDriver::in_use`] reports one, and deleting a volume a loop device
//! is attached to is refused.

mod changes;
mod copy;
pub(crate) mod pool;
mod sidecar;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};

use self::copy::CopyMethod;
use self::pool::{statvfs, Pool};
use self::sidecar::{SnapshotRecord, VolumeRecord};
use crate::loopdev::{self, LoopDevice};
use crate::{
    ChangedRange, ConnectionInfo, DriverError, DriverErrorKind, ExportOptions, ExportTarget,
    Metadata, PoolIdentity, PoolInfo, Result, SnapshotInfo, VolumeDriver, VolumeInfo,
};

/// Loop devices address whole 512-byte sectors: a volume's size must be a
/// multiple of this.
const SECTOR: u64 = 512;

/// The `file` driver of one configured backend.
#[derive(Debug, Clone)]
pub struct FileDriver {
    backend: String,
    pools: BTreeMap<String, PathBuf>,
    /// Per pool name, whether its file system can reflink (probed once).
    reflink_support: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl FileDriver {
    /// A driver for `pools` (name to directory). Each directory must exist
    /// already: the driver never creates a pool, so a typo or an unmounted
    /// file system is an error here rather than a new empty directory.
    pub fn new(backend_name: &str, pools: BTreeMap<String, PathBuf>) -> Result<FileDriver> {
        let backend = format!("file backend '{backend_name}'");
        if pools.is_empty() {
            return Err(DriverError::new(
                DriverErrorKind::InvalidArgument,
                backend,
                "configuration",
                "no pools configured",
            ));
        }
        let mut resolved = BTreeMap::new();
        for (name, dir) in pools {
            let label = format!("{backend} pool '{name}'");
            let object = format!("directory {}", dir.display());
            let meta = std::fs::metadata(&dir).map_err(|e| {
                DriverError::io(&label, &object, "pool directory is not accessible", e)
            })?;
            if !meta.is_dir() {
                return Err(DriverError::new(
                    DriverErrorKind::InvalidArgument,
                    label,
                    object,
                    "pool path is not a directory",
                ));
            }
            // Absolute, so the paths handed out in exports (and recorded by
            // the engine) do not depend on the working directory. Symlinks
            // are kept: they are the administrator's choice.
            let dir = std::path::absolute(&dir)
                .map_err(|e| DriverError::io(&label, &object, "resolving the pool directory", e))?;
            debug!(pool = %name, dir = %dir.display(), "file pool");
            resolved.insert(name, dir);
        }
        Ok(FileDriver {
            backend: backend_name.to_string(),
            pools: resolved,
            reflink_support: Arc::default(),
        })
    }

    pub(crate) fn pool(&self, pool: &str) -> Result<Pool<'_>> {
        match self.pools.get_key_value(pool) {
            Some((name, dir)) => Ok(Pool {
                name,
                dir,
                label: format!("file backend '{}' pool '{name}'", self.backend),
            }),
            None => Err(DriverError::new(
                DriverErrorKind::NotFound,
                format!("file backend '{}'", self.backend),
                format!("pool '{pool}'"),
                format!(
                    "no such pool (configured: {})",
                    self.pools
                        .keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }
}

impl VolumeDriver for FileDriver {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn pools(&self) -> Result<Vec<PoolInfo>> {
        let mut out = Vec::with_capacity(self.pools.len());
        for name in self.pools.keys() {
            let pool = self.pool(name)?;
            let identity = self.pool_identity(name)?;
            let fs = statvfs(pool.dir).map_err(|e| pool.io_err("pool", "statvfs", e))?;
            out.push(PoolInfo {
                name: name.clone(),
                identity,
                capacity_bytes: fs.capacity,
                free_bytes: fs.free,
            });
        }
        Ok(out)
    }

    /// The pool directory's device and inode, after following symlinks: the
    /// same directory reached by any path, symlink or bind mount has one
    /// identity.
    fn pool_identity(&self, pool: &str) -> Result<PoolIdentity> {
        let pool = self.pool(pool)?;
        let meta = std::fs::metadata(pool.dir)
            .map_err(|e| pool.io_err("pool", "stat of the pool directory", e))?;
        Ok(PoolIdentity(format!(
            "file:dev={}:ino={}",
            meta.dev(),
            meta.ino()
        )))
    }

    fn create_volume(
        &self,
        pool: &str,
        id: &str,
        name: &str,
        size: u64,
        metadata: &Metadata,
    ) -> Result<VolumeInfo> {
        let pool = self.pool(pool)?;
        pool.check_id("volume", id)?;
        let object = format!("volume {id}");
        if size == 0 || size % SECTOR != 0 {
            return Err(pool.err(
                DriverErrorKind::InvalidArgument,
                object,
                format!("size {size} is not a positive multiple of {SECTOR} bytes"),
            ));
        }
        // The image is sparse, but a volume that could never be filled
        // would fail at the worst time (mid-restore): refuse it now.
        let fs = statvfs(pool.dir).map_err(|e| pool.io_err(&object, "statvfs of the pool", e))?;
        if size > fs.free {
            return Err(pool.err(
                DriverErrorKind::NoSpace,
                object,
                format!(
                    "a volume of {size} bytes does not fit pool '{}': {} bytes free",
                    pool.name, fs.free
                ),
            ));
        }
        let (img, json) = (pool.volume_img(id), pool.volume_json(id));
        if json.exists() {
            return Err(pool.err(
                DriverErrorKind::AlreadyExists,
                object,
                format!("volume '{id}' already exists"),
            ));
        }
        // create_new: of two concurrent creates of one id, one fails here.
        volback_connectors::local::create_sparse_file(&img, size).map_err(|e| {
            if e.source.kind() == io::ErrorKind::AlreadyExists {
                pool.err(
                    DriverErrorKind::AlreadyExists,
                    &object,
                    format!(
                        "{} already exists (an unfinished create? delete the volume first)",
                        img.display()
                    ),
                )
            } else {
                pool.io_err(&object, format!("creating {}", img.display()), e.source)
            }
        })?;
        if let Err(e) = File::open(&img).and_then(|f| f.sync_all()) {
            let _ = std::fs::remove_file(&img);
            return Err(pool.io_err(&object, format!("syncing {}", img.display()), e));
        }
        let rec = VolumeRecord {
            id: id.to_string(),
            name: name.to_string(),
            size,
            metadata: metadata.clone(),
            created: sidecar::now_unix(),
        };
        pool.commit(&object, &json, &img, &rec)?;
        info!(pool = %pool.name, volume = id, size, "created volume");
        Ok(pool.volume_info(rec))
    }

    fn delete_volume(&self, pool: &str, id: &str) -> Result<()> {
        let pool = self.pool(pool)?;
        pool.check_id("volume", id)?;
        let object = format!("volume {id}");
        let img = pool.volume_img(id);
        pool.refuse_if_attached(&object, &img)?;
        pool.remove_pair(&object, &img, &pool.volume_json(id))?;
        info!(pool = %pool.name, volume = id, "deleted volume");
        Ok(())
    }

    fn get_volume(&self, pool: &str, id: &str) -> Result<VolumeInfo> {
        let pool = self.pool(pool)?;
        pool.check_id("volume", id)?;
        let rec = pool.read_volume(id)?;
        Ok(pool.volume_info(rec))
    }

    fn list_volumes(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        let pool = self.pool(pool)?;
        let entries = std::fs::read_dir(pool.dir)
            .map_err(|e| pool.io_err("pool", "listing the pool directory", e))?;
        let mut ids = std::collections::BTreeSet::new();
        let mut images = std::collections::BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| pool.io_err("pool", "listing the pool directory", e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name
                .strip_prefix("volume-")
                .and_then(|n| n.strip_suffix(".json"))
            {
                ids.insert(id.to_string());
            } else if let Some(id) = name
                .strip_prefix("volume-")
                .and_then(|n| n.strip_suffix(".img"))
            {
                images.insert(id.to_string());
            }
        }
        let mut out = Vec::new();
        for id in &ids {
            if !images.contains(id) {
                warn!(pool = %pool.name, volume = %id, "sidecar without an image file (unfinished delete?); skipped");
                continue;
            }
            match pool.read_volume(id) {
                Ok(rec) => out.push(pool.volume_info(rec)),
                Err(e) => {
                    warn!(pool = %pool.name, volume = %id, error = %e, "unreadable volume; skipped")
                }
            }
        }
        for id in images.difference(&ids) {
            warn!(pool = %pool.name, volume = %id, "image file without a sidecar (unfinished create?); skipped");
        }
        Ok(out)
    }

    fn create_snapshot(
        &self,
        pool: &str,
        volume_id: &str,
        snapshot_id: &str,
    ) -> Result<SnapshotInfo> {
        let pool = self.pool(pool)?;
        pool.check_id("volume", volume_id)?;
        pool.check_id("snapshot", snapshot_id)?;
        let object = format!("snapshot {snapshot_id}");
        let vol = pool.read_volume(volume_id)?;
        let (img, json) = (
            pool.snapshot_img(snapshot_id),
            pool.snapshot_json(snapshot_id),
        );
        if json.exists() {
            return Err(pool.err(
                DriverErrorKind::AlreadyExists,
                object,
                format!("snapshot '{snapshot_id}' already exists"),
            ));
        }
        // What was written through a loop device may still sit in that
        // device's page cache, which the image file does not see: flush it
        // down first. Writes after this point are not in the snapshot; the
        // caller quiesces writers if it needs more than that.
        let vol_img = pool.volume_img(volume_id);
        for dev in pool.attached(&object, &vol_img)? {
            loopdev::flush(&dev)
                .map_err(|e| pool.io_err(&object, format!("flushing {}", dev.display()), e))?;
        }
        let method = pool.copy_image(&object, &vol_img, &img, vol.size)?;
        let rec = SnapshotRecord {
            id: snapshot_id.to_string(),
            volume_id: volume_id.to_string(),
            size: vol.size,
            created: sidecar::now_unix(),
            reflinked: method == CopyMethod::Reflink,
        };
        pool.commit(&object, &json, &img, &rec)?;
        info!(pool = %pool.name, volume = volume_id, snapshot = snapshot_id, "created snapshot");
        Ok(SnapshotInfo {
            id: rec.id,
            volume_id: rec.volume_id,
            pool: pool.name.to_string(),
            size: rec.size,
        })
    }

    fn delete_snapshot(&self, pool: &str, snapshot_id: &str) -> Result<()> {
        let pool = self.pool(pool)?;
        pool.check_id("snapshot", snapshot_id)?;
        let object = format!("snapshot {snapshot_id}");
        let img = pool.snapshot_img(snapshot_id);
        // Deleting an attached image would leave a loop device on a file
        // nobody can find by path any more.
        pool.refuse_if_attached(&object, &img)?;
        pool.remove_pair(&object, &img, &pool.snapshot_json(snapshot_id))?;
        info!(pool = %pool.name, snapshot = snapshot_id, "deleted snapshot");
        Ok(())
    }

    fn create_volume_from_snapshot(
        &self,
        pool: &str,
        snapshot_id: &str,
        id: &str,
        name: &str,
    ) -> Result<VolumeInfo> {
        let pool = self.pool(pool)?;
        pool.check_id("snapshot", snapshot_id)?;
        pool.check_id("volume", id)?;
        let object = format!("volume {id}");
        let snap = pool.read_snapshot(snapshot_id)?;
        let (img, json) = (pool.volume_img(id), pool.volume_json(id));
        if json.exists() {
            return Err(pool.err(
                DriverErrorKind::AlreadyExists,
                object,
                format!("volume '{id}' already exists"),
            ));
        }
        pool.copy_image(&object, &pool.snapshot_img(snapshot_id), &img, snap.size)?;
        let rec = VolumeRecord {
            id: id.to_string(),
            name: name.to_string(),
            size: snap.size,
            metadata: Metadata::new(),
            created: sidecar::now_unix(),
        };
        pool.commit(&object, &json, &img, &rec)?;
        info!(pool = %pool.name, snapshot = snapshot_id, volume = id, "created volume from snapshot");
        Ok(pool.volume_info(rec))
    }

    /// Every call with `loop_device` attaches a new loop device (direct I/O
    /// on the image); [`VolumeDriver::unexport`] detaches them all.
    fn export(
        &self,
        pool: &str,
        target: &ExportTarget,
        opts: ExportOptions,
    ) -> Result<ConnectionInfo> {
        let pool = self.pool(pool)?;
        let (object, img) = pool.target_image(target)?;
        // Snapshots are immutable: always exported read-only.
        let read_only = match target {
            ExportTarget::Volume(id) => {
                pool.read_volume(id)?;
                opts.read_only
            }
            ExportTarget::Snapshot(id) => {
                pool.read_snapshot(id)?;
                true
            }
        };
        let path = if opts.loop_device {
            let dev = LoopDevice::attach(&img, read_only, true).map_err(|e| {
                pool.io_err(
                    &object,
                    format!("attaching a loop device to {}", img.display()),
                    e,
                )
            })?;
            // From here the attachment outlives this call: unexport (or the
            // engine's recovery, through find_attached) detaches it.
            let dev = dev.into_path();
            info!(pool = %pool.name, %object, device = %dev.display(), read_only, "exported through a loop device");
            dev
        } else {
            debug!(pool = %pool.name, %object, read_only, "exported as a file");
            img
        };
        Ok(ConnectionInfo {
            connector: "local".to_string(),
            properties: BTreeMap::from([("path".to_string(), path.to_string_lossy().into_owned())]),
            read_only,
        })
    }

    fn unexport(&self, pool: &str, target: &ExportTarget) -> Result<()> {
        let pool = self.pool(pool)?;
        let (object, img) = pool.target_image(target)?;
        for dev in pool.attached(&object, &img)? {
            loopdev::detach_path(&dev).map_err(|e| {
                pool.io_err(
                    &object,
                    format!("detaching loop device {}", dev.display()),
                    e,
                )
            })?;
            info!(pool = %pool.name, %object, device = %dev.display(), "detached loop device");
        }
        Ok(())
    }

    /// True while a loop device is attached to the volume's image. A volume
    /// that does not exist is not in use.
    fn in_use(&self, pool: &str, id: &str) -> Result<bool> {
        let pool = self.pool(pool)?;
        pool.check_id("volume", id)?;
        let object = format!("volume {id}");
        Ok(!pool.attached(&object, &pool.volume_img(id))?.is_empty())
    }

    /// True when the pool's file system is one whose extent maps
    /// `changes` trusts (XFS, btrfs) and it accepts FICLONE there: probed
    /// once per pool by cloning a small hidden file in the pool directory.
    fn supports_change_tracking(&self, pool: &str) -> Result<bool> {
        let pool = self.pool(pool)?;
        let cache = || {
            self.reflink_support
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        if let Some(&known) = cache().get(pool.name) {
            return Ok(known);
        }
        let supported = changes::probe_reflink(pool.dir)
            .map_err(|e| pool.io_err("pool", "probing for reflink support", e))?;
        debug!(pool = %pool.name, supported, "probed change tracking (reflink) support");
        cache().insert(pool.name.to_string(), supported);
        Ok(supported)
    }

    /// The extents of `to_snapshot` not shared with `from_snapshot` (see
    /// `changes`); `None` unless both are reflinked snapshots of the same
    /// volume, of the same size, on a file system whose extent maps can
    /// be trusted.
    fn changed_ranges(
        &self,
        pool: &str,
        from_snapshot: &str,
        to_snapshot: &str,
    ) -> Result<Option<Vec<ChangedRange>>> {
        let pool = self.pool(pool)?;
        pool.check_id("snapshot", from_snapshot)?;
        pool.check_id("snapshot", to_snapshot)?;
        let from = pool.read_snapshot(from_snapshot)?;
        let to = pool.read_snapshot(to_snapshot)?;
        changes::changed_ranges(&pool, &from, &to)
    }
}
