//! The `rbd` volume driver: pools are Ceph pools, volumes are RBD images
//! in them, reached in-process through librbd (`volback_connectors::rbd`).
//!
//! A volback pool name maps to a Ceph pool (`pools:` in the configuration).
//! Volume `<id>` is the image `volume-<id>` (format 2, layering only); its
//! name and metadata live in the image's metadata as `volback.name` and
//! `volback.meta.<key>`. `volback.name` is written last on create, so an
//! image without it is an unfinished create: listing skips it with a
//! warning and deleting the id again removes it.
//!
//! Snapshot `<id>` is the RBD snapshot `snapshot-<id>` of its volume's
//! image. Snapshots are not independent of their volume: a volume that
//! still has snapshots is not deleted (Busy; the engine deletes snapshots
//! first). Change tracking is RBD's own diff between two snapshots.
//!
//! Nothing is mapped on export: the connection info names the pool, image
//! (and snapshot) and how to reach the cluster (conf, user, keyring path,
//! never a key), and the `rbd` connector opens it in-process.

mod fast_path;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};
use volback_connectors::rbd::{
    ClusterConfig, Image, IoCtx, Rados, RbdError, SnapInfo, RBD_FEATURE_LAYERING,
};

use crate::{
    merge_ranges, ChangedRange, ConnectionInfo, DriverError, DriverErrorKind, ExportOptions,
    ExportTarget, Metadata, PoolIdentity, PoolInfo, Result, SnapshotInfo, VolumeDriver, VolumeInfo,
};

const VOLUME_PREFIX: &str = "volume-";
const SNAPSHOT_PREFIX: &str = "snapshot-";
const NAME_KEY: &str = "volback.name";
const META_PREFIX: &str = "volback.meta.";

/// The `rbd` driver of one configured backend.
pub struct RbdDriver {
    backend: String,
    cluster: ClusterConfig,
    /// volback pool name to Ceph pool name.
    pools: BTreeMap<String, String>,
    /// The cluster connection, made at the first call that needs it.
    rados: Mutex<Option<Arc<Rados>>>,
    /// One I/O context per volback pool, opened on first use.
    ioctxs: Mutex<BTreeMap<String, Arc<IoCtx>>>,
}

impl std::fmt::Debug for RbdDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdDriver")
            .field("backend", &self.backend)
            .field("cluster", &self.cluster)
            .field("pools", &self.pools)
            .finish_non_exhaustive()
    }
}

fn kind_of(e: &RbdError) -> DriverErrorKind {
    match e.errno() {
        Some(libc::ENOENT) => DriverErrorKind::NotFound,
        Some(libc::EEXIST) => DriverErrorKind::AlreadyExists,
        Some(libc::EBUSY) | Some(libc::ENOTEMPTY) => DriverErrorKind::Busy,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => DriverErrorKind::NoSpace,
        Some(libc::EINVAL) | Some(libc::ERANGE) => DriverErrorKind::InvalidArgument,
        _ => DriverErrorKind::Io,
    }
}

fn is_errno(e: &RbdError, errno: i32) -> bool {
    e.errno() == Some(errno)
}

/// A volback pool resolved to its Ceph pool and I/O context.
struct Pool<'a> {
    name: &'a str,
    ceph_pool: &'a str,
    ioctx: Arc<IoCtx>,
    label: String,
}

impl Pool<'_> {
    fn err(
        &self,
        kind: DriverErrorKind,
        object: impl Into<String>,
        message: impl Into<String>,
    ) -> DriverError {
        DriverError::new(kind, &self.label, object, message)
    }

    /// The error of creating a volume's image: AlreadyExists for EEXIST.
    fn create_err(
        &self,
        object: &str,
        id: &str,
        image: &str,
        what: &str,
        e: RbdError,
    ) -> DriverError {
        if is_errno(&e, libc::EEXIST) {
            self.err(
                DriverErrorKind::AlreadyExists,
                object,
                format!("volume '{id}' already exists (image {image})"),
            )
        } else {
            self.rbd_err(object, what, e)
        }
    }

    /// Writes a new image's metadata, its name last (an image with a name
    /// is a finished volume), and removes the image if that fails.
    fn finish_volume(
        &self,
        object: &str,
        id: &str,
        image_name: &str,
        name: &str,
        metadata: &Metadata,
    ) -> Result<VolumeInfo> {
        let finish = || -> Result<VolumeInfo> {
            let image = self.open_volume(id, false)?;
            for (k, v) in metadata {
                image
                    .metadata_set(&format!("{META_PREFIX}{k}"), v)
                    .map_err(|e| self.rbd_err(object, "writing the image metadata", e))?;
            }
            image
                .metadata_set(NAME_KEY, name)
                .map_err(|e| self.rbd_err(object, "writing the image metadata", e))?;
            self.volume_info(id, &image)
        };
        finish().inspect_err(|_| {
            if let Err(re) = self.ioctx.remove_image(image_name) {
                warn!(pool = %self.name, volume = id, error = %re, "could not remove the unfinished image");
            }
        })
    }

    fn rbd_err(&self, object: impl Into<String>, what: &str, e: RbdError) -> DriverError {
        self.err(kind_of(&e), object, format!("{what}: {e}"))
    }

    fn check_id(&self, what: &str, id: &str) -> Result<()> {
        if crate::valid_id(id) {
            Ok(())
        } else {
            Err(self.err(
                DriverErrorKind::InvalidArgument,
                format!("{what} '{id}'"),
                crate::invalid_id_message(what),
            ))
        }
    }

    /// Opens the volume's image; NotFound names the pool and the id.
    fn open_volume(&self, id: &str, read_only: bool) -> Result<Image> {
        self.ioctx
            .open_image(&volume_image(id), None, read_only)
            .map_err(|e| {
                if is_errno(&e, libc::ENOENT) {
                    self.not_found_volume(id)
                } else {
                    self.rbd_err(format!("volume {id}"), "opening the image", e)
                }
            })
    }

    fn not_found_volume(&self, id: &str) -> DriverError {
        self.err(
            DriverErrorKind::NotFound,
            format!("volume {id}"),
            format!(
                "no volume '{id}' in pool '{}' (ceph pool '{}')",
                self.name, self.ceph_pool
            ),
        )
    }

    fn not_found_snapshot(&self, id: &str) -> DriverError {
        self.err(
            DriverErrorKind::NotFound,
            format!("snapshot {id}"),
            format!(
                "no snapshot '{id}' in pool '{}' (ceph pool '{}')",
                self.name, self.ceph_pool
            ),
        )
    }

    /// The ids of the pool's volume images (finished or not).
    fn volume_ids(&self) -> Result<Vec<String>> {
        let names = self
            .ioctx
            .list_images()
            .map_err(|e| self.rbd_err("pool", "listing images", e))?;
        Ok(names
            .iter()
            .filter_map(|n| n.strip_prefix(VOLUME_PREFIX))
            .map(str::to_string)
            .collect())
    }

    /// The volume image holding snapshot `snapshot_id`, and the snapshot,
    /// if any volume of the pool has it.
    fn find_snapshot(&self, snapshot_id: &str) -> Result<Option<(String, SnapInfo)>> {
        let snap_name = snapshot_name(snapshot_id);
        for vid in self.volume_ids()? {
            let image = match self.ioctx.open_image(&volume_image(&vid), None, true) {
                Ok(i) => i,
                // Removed since the listing.
                Err(e) if is_errno(&e, libc::ENOENT) => continue,
                Err(e) => {
                    return Err(self.rbd_err(format!("volume {vid}"), "opening the image", e))
                }
            };
            let snaps = image
                .snap_list()
                .map_err(|e| self.rbd_err(format!("volume {vid}"), "listing snapshots", e))?;
            if let Some(s) = snaps.into_iter().find(|s| s.name == snap_name) {
                return Ok(Some((vid, s)));
            }
        }
        Ok(None)
    }

    fn require_snapshot(&self, snapshot_id: &str) -> Result<(String, SnapInfo)> {
        self.find_snapshot(snapshot_id)?
            .ok_or_else(|| self.not_found_snapshot(snapshot_id))
    }

    fn volume_info(&self, id: &str, image: &Image) -> Result<VolumeInfo> {
        let object = format!("volume {id}");
        let size = image
            .size()
            .map_err(|e| self.rbd_err(&object, "reading the size", e))?;
        let mut name = None;
        let mut metadata = Metadata::new();
        for (k, v) in image
            .metadata_list()
            .map_err(|e| self.rbd_err(&object, "reading the image metadata", e))?
        {
            if k == NAME_KEY {
                name = Some(v);
            } else if let Some(key) = k.strip_prefix(META_PREFIX) {
                metadata.insert(key.to_string(), v);
            }
        }
        let Some(name) = name else {
            return Err(self.err(
                DriverErrorKind::NotFound,
                object,
                format!(
                    "image {} in ceph pool '{}' has no {NAME_KEY} (an unfinished create? delete the volume again)",
                    volume_image(id),
                    self.ceph_pool
                ),
            ));
        };
        Ok(VolumeInfo {
            id: id.to_string(),
            name,
            pool: self.name.to_string(),
            size,
            metadata,
        })
    }
}

fn volume_image(id: &str) -> String {
    format!("{VOLUME_PREFIX}{id}")
}

fn snapshot_name(id: &str) -> String {
    format!("{SNAPSHOT_PREFIX}{id}")
}

impl RbdDriver {
    /// A driver for `pools` (volback pool name to Ceph pool name). Does
    /// not connect: the first call that needs the cluster does, bounded by
    /// `cluster.connect_timeout`.
    pub fn new(
        backend_name: &str,
        cluster: ClusterConfig,
        pools: BTreeMap<String, String>,
    ) -> Result<RbdDriver> {
        if pools.is_empty() {
            return Err(DriverError::new(
                DriverErrorKind::InvalidArgument,
                format!("rbd backend '{backend_name}'"),
                "configuration",
                "no pools configured",
            ));
        }
        Ok(RbdDriver {
            backend: backend_name.to_string(),
            cluster,
            pools,
            rados: Mutex::new(None),
            ioctxs: Mutex::new(BTreeMap::new()),
        })
    }

    fn label(&self) -> String {
        format!("rbd backend '{}'", self.backend)
    }

    fn conf_display(&self) -> String {
        match &self.cluster.conf {
            Some(p) => p.display().to_string(),
            None => "the default ceph.conf".to_string(),
        }
    }

    /// The cluster connection, connecting now if not yet connected. A
    /// failed connect is not cached: the next call tries again.
    fn rados(&self) -> Result<Arc<Rados>> {
        let mut guard = self.rados.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = &*guard {
            return Ok(r.clone());
        }
        let r = Rados::connect(&self.cluster).map_err(|e| {
            DriverError::new(
                kind_of(&e),
                self.label(),
                format!("cluster (conf {})", self.conf_display()),
                format!("cannot connect to the ceph cluster: {e}"),
            )
        })?;
        *guard = Some(r.clone());
        Ok(r)
    }

    fn pool(&self, pool: &str) -> Result<Pool<'_>> {
        let Some((name, ceph_pool)) = self.pools.get_key_value(pool) else {
            return Err(DriverError::new(
                DriverErrorKind::NotFound,
                self.label(),
                format!("pool '{pool}'"),
                format!(
                    "no such pool (configured: {})",
                    self.pools
                        .keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        let label = format!(
            "rbd backend '{}' pool '{name}' (ceph pool '{ceph_pool}')",
            self.backend
        );
        let rados = self.rados()?;
        let mut ioctxs = self.ioctxs.lock().unwrap_or_else(|p| p.into_inner());
        let ioctx = match ioctxs.get(name) {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(rados.ioctx(ceph_pool, None).map_err(|e| {
                    let msg = if is_errno(&e, libc::ENOENT) {
                        format!("ceph pool '{ceph_pool}' does not exist: {e}")
                    } else {
                        format!("opening ceph pool '{ceph_pool}': {e}")
                    };
                    DriverError::new(kind_of(&e), &label, "pool", msg)
                })?);
                ioctxs.insert(name.clone(), c.clone());
                c
            }
        };
        Ok(Pool {
            name,
            ceph_pool,
            ioctx,
            label,
        })
    }

    fn connection_properties(&self, pool: &Pool<'_>, image: String) -> BTreeMap<String, String> {
        let mut p = BTreeMap::from([
            ("pool".to_string(), pool.ceph_pool.to_string()),
            ("image".to_string(), image),
        ]);
        let abs = |path: &PathBuf| {
            std::path::absolute(path)
                .unwrap_or_else(|_| path.clone())
                .to_string_lossy()
                .into_owned()
        };
        if let Some(conf) = &self.cluster.conf {
            p.insert("conf".to_string(), abs(conf));
        }
        if let Some(id) = &self.cluster.id {
            p.insert("id".to_string(), id.clone());
        }
        // A path: the key itself never leaves the keyring file.
        if let Some(k) = &self.cluster.keyring {
            p.insert("keyring".to_string(), abs(k));
        }
        let ms = |d: std::time::Duration| d.as_millis().to_string();
        p.insert(
            "connect_timeout_ms".to_string(),
            ms(self.cluster.connect_timeout),
        );
        p.insert("op_timeout_ms".to_string(), ms(self.cluster.op_timeout));
        p
    }
}

impl VolumeDriver for RbdDriver {
    fn kind(&self) -> &'static str {
        "rbd"
    }

    /// Capacity and free space are reported as 0: the librbd wrapper does
    /// not bind `rados_cluster_stat` (nor per-pool stats) yet.
    fn pools(&self) -> Result<Vec<PoolInfo>> {
        let mut out = Vec::with_capacity(self.pools.len());
        let (capacity_bytes, free_bytes) = self.rados()?.capacity().map_err(|e| {
            DriverError::new(
                kind_of(&e),
                self.label(),
                "cluster",
                format!("reading capacity: {e}"),
            )
        })?;
        for name in self.pools.keys() {
            out.push(PoolInfo {
                name: name.clone(),
                identity: self.pool_identity(name)?,
                capacity_bytes,
                free_bytes,
            });
        }
        Ok(out)
    }

    /// The cluster's fsid and the Ceph pool's id: two volback names for one
    /// Ceph pool are one pool, a pool of the same name in another cluster
    /// is another. (Namespaces are not used by this driver.)
    fn pool_identity(&self, pool: &str) -> Result<PoolIdentity> {
        let p = self.pool(pool)?;
        let rados = self.rados()?;
        let fsid = rados
            .fsid()
            .map_err(|e| p.rbd_err("pool", "reading the cluster fsid", e))?;
        let id = rados
            .pool_id(p.ceph_pool)
            .map_err(|e| p.rbd_err("pool", "looking up the pool id", e))?;
        Ok(PoolIdentity(format!("rbd:fsid={fsid}:pool={id}")))
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
        if size == 0 {
            return Err(pool.err(
                DriverErrorKind::InvalidArgument,
                object,
                "size 0: a volume must have a positive size",
            ));
        }
        let image_name = volume_image(id);
        pool.ioctx
            .create_image(&image_name, size, RBD_FEATURE_LAYERING)
            .map_err(|e| pool.create_err(&object, id, &image_name, "creating the image", e))?;
        let v = pool.finish_volume(&object, id, &image_name, name, metadata)?;
        info!(pool = %pool.name, volume = id, size, "created volume");
        Ok(v)
    }

    /// Refused (Busy) while the volume has snapshots, or while a client
    /// still watches the image.
    fn delete_volume(&self, pool: &str, id: &str) -> Result<()> {
        let pool = self.pool(pool)?;
        pool.check_id("volume", id)?;
        let object = format!("volume {id}");
        let snaps = match pool.open_volume(id, true) {
            Ok(image) => image
                .snap_list()
                .map_err(|e| pool.rbd_err(&object, "listing snapshots", e))?,
            Err(e) if e.kind == DriverErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if !snaps.is_empty() {
            return Err(pool.err(
                DriverErrorKind::Busy,
                object,
                format!(
                    "the volume still has {} snapshot(s) ({}): delete them first",
                    snaps.len(),
                    snaps
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        match pool.ioctx.remove_image(&volume_image(id)) {
            Ok(()) => {}
            Err(e) if is_errno(&e, libc::ENOENT) => return Ok(()),
            Err(e) if is_errno(&e, libc::EBUSY) => {
                return Err(pool.err(
                    DriverErrorKind::Busy,
                    object,
                    format!("the image is in use (it has watchers): {e}"),
                ))
            }
            Err(e) => return Err(pool.rbd_err(object, "removing the image", e)),
        }
        info!(pool = %pool.name, volume = id, "deleted volume");
        Ok(())
    }

    fn get_volume(&self, pool: &str, id: &str) -> Result<VolumeInfo> {
        let pool = self.pool(pool)?;
        pool.check_id("volume", id)?;
        let image = pool.open_volume(id, true)?;
        pool.volume_info(id, &image)
    }

    fn list_volumes(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        let pool = self.pool(pool)?;
        let mut out = Vec::new();
        for id in pool.volume_ids()? {
            let got = pool
                .open_volume(&id, true)
                .and_then(|image| pool.volume_info(&id, &image));
            match got {
                Ok(v) => out.push(v),
                Err(e) => {
                    warn!(pool = %pool.name, volume = %id, error = %e, "unreadable or unfinished volume; skipped")
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// An RBD snapshot of the volume's image. librbd asks the image's other
    /// clients (watchers, such as an open `rbd` device) to quiesce and
    /// flush before taking it; writes after this call are not in it.
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
        if let Some((vid, _)) = pool.find_snapshot(snapshot_id)? {
            return Err(pool.err(
                DriverErrorKind::AlreadyExists,
                object,
                format!("snapshot '{snapshot_id}' already exists (of volume '{vid}')"),
            ));
        }
        let image = pool.open_volume(volume_id, false)?;
        image
            .snap_create(&snapshot_name(snapshot_id))
            .map_err(|e| pool.rbd_err(&object, "creating the snapshot", e))?;
        let snaps = image
            .snap_list()
            .map_err(|e| pool.rbd_err(&object, "listing snapshots", e))?;
        let name = snapshot_name(snapshot_id);
        let size = match snaps.iter().find(|s| s.name == name) {
            Some(s) => s.size,
            None => image
                .size()
                .map_err(|e| pool.rbd_err(&object, "reading the size", e))?,
        };
        info!(pool = %pool.name, volume = volume_id, snapshot = snapshot_id, "created snapshot");
        Ok(SnapshotInfo {
            id: snapshot_id.to_string(),
            volume_id: volume_id.to_string(),
            pool: pool.name.to_string(),
            size,
        })
    }

    /// Finds the volume image holding the snapshot (by listing the pool's
    /// volumes' snapshots), unprotects it if a clone had protected it, and
    /// removes it. Busy while a volume cloned from it exists.
    fn delete_snapshot(&self, pool: &str, snapshot_id: &str) -> Result<()> {
        let pool = self.pool(pool)?;
        pool.check_id("snapshot", snapshot_id)?;
        let object = format!("snapshot {snapshot_id}");
        let Some((vid, _)) = pool.find_snapshot(snapshot_id)? else {
            return Ok(());
        };
        let image = match pool.open_volume(&vid, false) {
            Ok(i) => i,
            Err(e) if e.kind == DriverErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let name = snapshot_name(snapshot_id);
        match image.snap_remove(&name) {
            Ok(()) => {}
            Err(e) if is_errno(&e, libc::ENOENT) => return Ok(()),
            // Protected (by create_volume_from_snapshot): unprotect, which
            // fails while clones of it exist, and try again.
            Err(e) if is_errno(&e, libc::EBUSY) => {
                image.snap_unprotect(&name).map_err(|e| {
                    pool.err(
                        DriverErrorKind::Busy,
                        &object,
                        format!("the snapshot is protected and cannot be unprotected (volumes cloned from it exist?): {e}"),
                    )
                })?;
                image
                    .snap_remove(&name)
                    .map_err(|e| pool.rbd_err(&object, "removing the snapshot", e))?;
            }
            Err(e) => return Err(pool.rbd_err(object, "removing the snapshot", e)),
        }
        info!(pool = %pool.name, volume = %vid, snapshot = snapshot_id, "deleted snapshot");
        Ok(())
    }

    /// A clone of the snapshot (copy-on-write, instant), not a copy: the
    /// snapshot is protected for it, and stays undeletable (Busy) until
    /// the new volume is deleted. The parent volume, having a snapshot,
    /// cannot be deleted either meanwhile. (No flatten in the wrapper yet.)
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
        let (vid, _) = pool.require_snapshot(snapshot_id)?;
        let snap = snapshot_name(snapshot_id);
        let parent = pool.open_volume(&vid, false)?;
        match parent.snap_protect(&snap) {
            Ok(()) => {}
            // Already protected (by an earlier clone).
            Err(e) if is_errno(&e, libc::EBUSY) => {}
            Err(e) => return Err(pool.rbd_err(&object, "protecting the snapshot", e)),
        }
        let child = volume_image(id);
        pool.ioctx
            .clone_image(
                &volume_image(&vid),
                &snap,
                &pool.ioctx,
                &child,
                RBD_FEATURE_LAYERING,
            )
            .map_err(|e| pool.create_err(&object, id, &child, "cloning the snapshot", e))?;
        let v = pool.finish_volume(&object, id, &child, name, &Metadata::new())?;
        info!(pool = %pool.name, snapshot = snapshot_id, volume = id, "created volume from snapshot (clone)");
        Ok(v)
    }

    fn export(
        &self,
        pool: &str,
        target: &ExportTarget,
        opts: ExportOptions,
    ) -> Result<ConnectionInfo> {
        let pool = self.pool(pool)?;
        let (props, read_only) = match target {
            ExportTarget::Volume(id) => {
                pool.check_id("volume", id)?;
                drop(pool.open_volume(id, true)?);
                (
                    self.connection_properties(&pool, volume_image(id)),
                    opts.read_only,
                )
            }
            ExportTarget::Snapshot(id) => {
                pool.check_id("snapshot", id)?;
                let (vid, _) = pool.require_snapshot(id)?;
                let mut p = self.connection_properties(&pool, volume_image(&vid));
                p.insert("snapshot".to_string(), snapshot_name(id));
                // Snapshots are immutable: always read-only.
                (p, true)
            }
        };
        debug!(pool = %pool.name, ?target, read_only, "exported");
        Ok(ConnectionInfo {
            connector: "rbd".to_string(),
            properties: props,
            read_only,
        })
    }

    /// Nothing to undo: librbd runs in the process that opens the image,
    /// and closes it when done.
    fn unexport(&self, pool: &str, _target: &ExportTarget) -> Result<()> {
        // Only check the pool name; no cluster call needed.
        if !self.pools.contains_key(pool) {
            self.pool(pool)?;
        }
        Ok(())
    }

    /// Always false: the librbd wrapper does not bind `rbd_watchers_list`
    /// yet, so the driver cannot see other clients. (Deleting a watched
    /// image still fails, with Busy.)
    /// In use when another client watches the image: librbd registers a
    /// watch for every writable open (a hypervisor, `rbd map`, another
    /// volback); our own read-only open here registers none.
    fn in_use(&self, pool: &str, id: &str) -> Result<bool> {
        let pool = self.pool(pool)?;
        pool.check_id("volume", id)?;
        let image = match pool.open_volume(id, true) {
            Ok(i) => i,
            Err(e) if e.kind == DriverErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let watchers = image.watcher_count().map_err(|e| {
            DriverError::new(
                kind_of(&e),
                &pool.label,
                format!("volume {id}"),
                format!("listing watchers: {e}"),
            )
        })?;
        Ok(watchers > 0)
    }

    fn supports_change_tracking(&self, pool: &str) -> Result<bool> {
        self.pool(pool)?;
        Ok(true)
    }

    /// Ceph to Ceph by RBD diffs (see [`fast_path`]).
    fn fast_path(&self) -> Option<&dyn crate::FastPath> {
        Some(self)
    }

    /// RBD's diff of `to_snapshot` against `from_snapshot`, including the
    /// parent for clones, byte-exact (not whole objects). Extents that no
    /// longer exist (discarded) are changes too. `None` unless both are
    /// snapshots of the same image with the same size.
    fn changed_ranges(
        &self,
        pool: &str,
        from_snapshot: &str,
        to_snapshot: &str,
    ) -> Result<Option<Vec<ChangedRange>>> {
        let pool = self.pool(pool)?;
        pool.check_id("snapshot", from_snapshot)?;
        pool.check_id("snapshot", to_snapshot)?;
        let (from_vol, from) = pool.require_snapshot(from_snapshot)?;
        let (to_vol, to) = pool.require_snapshot(to_snapshot)?;
        if from_vol != to_vol || from.size != to.size {
            debug!(pool = %pool.name, from_vol, to_vol, from_size = from.size, to_size = to.size,
                "snapshots of different volumes or sizes: no change tracking");
            return Ok(None);
        }
        let object = format!("snapshot {to_snapshot}");
        let image = pool
            .ioctx
            .open_image(&volume_image(&to_vol), Some(&to.name), true)
            .map_err(|e| pool.rbd_err(&object, "opening the snapshot", e))?;
        let mut ranges = Vec::new();
        let mut cb = |offset: u64, len: u64, _exists: bool| {
            ranges.push(ChangedRange { offset, len });
        };
        image
            .diff_iterate2(Some(&from.name), 0, to.size, true, false, &mut cb)
            .map_err(|e| pool.rbd_err(&object, "diffing the snapshots", e))?;
        let ranges = merge_ranges(ranges);
        debug!(pool = %pool.name, from = from_snapshot, to = to_snapshot, extents = ranges.len(), "changed ranges");
        Ok(Some(ranges))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, len: u64) -> ChangedRange {
        ChangedRange { offset, len }
    }

    #[test]
    fn merge_sorts_and_joins() {
        assert_eq!(
            merge_ranges(vec![
                r(10, 5),
                r(0, 4),
                r(4, 2),
                r(12, 10),
                r(30, 0),
                r(40, 1)
            ]),
            vec![r(0, 6), r(10, 12), r(40, 1)]
        );
        assert!(merge_ranges(vec![]).is_empty());
    }

    #[test]
    fn new_refuses_no_pools() {
        let e = RbdDriver::new("b", ClusterConfig::default(), BTreeMap::new()).unwrap_err();
        assert_eq!(e.kind, DriverErrorKind::InvalidArgument);
    }
}
