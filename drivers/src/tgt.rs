//! The `tgt` volume driver: a backend that is an iSCSI array, served by the
//! Linux SCSI target daemon (tgtd) on this host.
//!
//! Storage is the `file` driver's: a pool is a directory, a volume a sparse
//! image with a JSON sidecar, a snapshot a reflink (FICLONE) or sparse copy,
//! changes between two reflinked snapshots come from FIEMAP. This driver
//! wraps a [`FileDriver`] for all of that and adds what makes it an array:
//! exports are iSCSI targets, created and removed with `tgtadm` (see
//! `tgtadm`), one target per exported volume or snapshot, its image as LUN 1.
//!
//! Target names are deterministic, so an export can be found again after a
//! crash: `<iqn_prefix>:<pool>:<id>` for a volume,
//! `<iqn_prefix>:<pool>:snap:<id>` for a snapshot. IQNs allow only
//! `[a-z0-9.:-]`: pool and id keep `[a-z0-9-]` and spell every other byte
//! `.xx` (hex), so the mapping is one to one (ids `A.b` and `a.b` get
//! different names). A name that would pass 223 bytes uses a 128-bit hash of
//! the id instead (`...:h:<hex>`, `...:snap:h:<hex>`). Whatever the name,
//! a target is only ever taken for ours when its LUN 1 is our image file.
//!
//! An export binds LUN 1 (`--bstype rdwr`, `thin_provisioning=1` so tgt
//! takes UNMAP; `readonly=1` for snapshots and read-only exports),
//! the CHAP accounts when configured (incoming, and outgoing for mutual
//! CHAP) and, last, the initiator ACL `ALL`: nobody can log in before the
//! target is complete. Secrets stay in their files: the connection info
//! names the files; tgtadm gets the secret on its command line (tgt has no
//! other way), which this driver never logs or puts in an error.
//!
//! Unexport unbinds the ACL (no new logins), ends the sessions, and deletes
//! the target. In use means the volume's target has a session. Deleting a
//! volume or snapshot unexports it first, and is refused while a session is
//! open.
//!
//! Pool identity is the file driver's, the pool directory's device and
//! inode: the data lives in that directory, whichever portal (or tgtd, or a
//! file backend) serves it, so the same directory behind two portals is the
//! same pool. tgtd must run on this host (the driver hands it local paths).

mod config;
mod iqn;
mod target;
mod tgtadm;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tracing::{debug, info, warn};

pub use self::config::{ChapConfig, TgtConfig, DEFAULT_IQN_PREFIX};
use self::iqn::target_iqn;
use self::tgtadm::Tgtadm;
use crate::file::FileDriver;
use crate::{
    ChangedRange, ConnectionInfo, DriverError, DriverErrorKind, ExportOptions, ExportTarget,
    Metadata, PoolIdentity, PoolInfo, Result, SnapshotInfo, VolumeDriver, VolumeInfo,
};

/// The LUN every export's image is.
const LUN: u32 = 1;
/// How long one tgtadm call may take.
const TGTADM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long unexport retries deleting a target with commands in flight.
const DELETE_RETRY: Duration = Duration::from_secs(15);

/// The `tgt` driver of one configured backend.
pub struct TgtDriver {
    backend: String,
    label: String,
    /// Normalized "host:port".
    portal: String,
    iqn_prefix: String,
    chap: Option<ChapConfig>,
    mutual_chap: Option<ChapConfig>,
    target_params: BTreeMap<String, String>,
    files: FileDriver,
    tgtadm: Tgtadm,
    /// Exports and unexports of this process, one at a time (another
    /// process racing is caught by tgtd's "already exists").
    lock: Mutex<()>,
    portal_checked: Mutex<bool>,
}

impl std::fmt::Debug for TgtDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TgtDriver")
            .field("backend", &self.backend)
            .field("portal", &self.portal)
            .field("control_port", &self.tgtadm.control_port)
            .field("iqn_prefix", &self.iqn_prefix)
            .field("chap", &self.chap)
            .field("mutual_chap", &self.mutual_chap)
            .finish_non_exhaustive()
    }
}

impl TgtDriver {
    /// A driver for `config`. Checks the configuration and the pool
    /// directories (which must exist) and reads the CHAP secrets once; does
    /// not talk to tgtd (the first export does).
    pub fn new(backend_name: &str, config: TgtConfig) -> Result<TgtDriver> {
        let label = format!("tgt backend '{backend_name}'");
        let portal = config::check(&label, &config)?;
        let files = FileDriver::new(backend_name, config.pools).map_err(relabel)?;
        Ok(TgtDriver {
            backend: backend_name.to_string(),
            label,
            portal,
            iqn_prefix: config.iqn_prefix,
            chap: config.chap,
            mutual_chap: config.mutual_chap,
            target_params: config.target_params,
            files,
            tgtadm: Tgtadm {
                program: "tgtadm".to_string(),
                control_port: config.control_port,
                timeout: TGTADM_TIMEOUT,
            },
            lock: Mutex::new(()),
            portal_checked: Mutex::new(false),
        })
    }

    /// The portal initiators are told to use ("host:port").
    pub fn portal(&self) -> &str {
        &self.portal
    }
}

/// Errors from the inner file driver, labelled as this backend's.
fn relabel(mut e: DriverError) -> DriverError {
    if let Some(rest) = e.backend.strip_prefix("file backend") {
        e.backend = format!("tgt backend{rest}");
    }
    e
}

impl VolumeDriver for TgtDriver {
    fn kind(&self) -> &'static str {
        "tgt"
    }

    fn pools(&self) -> Result<Vec<PoolInfo>> {
        self.files.pools().map_err(relabel)
    }

    /// The pool directory's device and inode, as for a file pool: the same
    /// directory is the same pool whatever serves it (see the module doc).
    fn pool_identity(&self, pool: &str) -> Result<PoolIdentity> {
        self.files.pool_identity(pool).map_err(relabel)
    }

    fn create_volume(
        &self,
        pool: &str,
        id: &str,
        name: &str,
        size: u64,
        metadata: &Metadata,
    ) -> Result<VolumeInfo> {
        self.files
            .create_volume(pool, id, name, size, metadata)
            .map_err(relabel)
    }

    /// Unexports the volume first; refused (Busy) while an initiator has a
    /// session on it.
    fn delete_volume(&self, pool: &str, id: &str) -> Result<()> {
        self.unexport_idle(pool, &ExportTarget::Volume(id.to_string()))?;
        self.files.delete_volume(pool, id).map_err(relabel)
    }

    fn get_volume(&self, pool: &str, id: &str) -> Result<VolumeInfo> {
        self.files.get_volume(pool, id).map_err(relabel)
    }

    fn list_volumes(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        self.files.list_volumes(pool).map_err(relabel)
    }

    /// A reflink or sparse copy of the image. Writes tgtd has completed are
    /// in the page cache, which both copies see; the caller quiesces
    /// initiators for anything more.
    fn create_snapshot(
        &self,
        pool: &str,
        volume_id: &str,
        snapshot_id: &str,
    ) -> Result<SnapshotInfo> {
        self.files
            .create_snapshot(pool, volume_id, snapshot_id)
            .map_err(relabel)
    }

    fn delete_snapshot(&self, pool: &str, snapshot_id: &str) -> Result<()> {
        self.unexport_idle(pool, &ExportTarget::Snapshot(snapshot_id.to_string()))?;
        self.files
            .delete_snapshot(pool, snapshot_id)
            .map_err(relabel)
    }

    fn create_volume_from_snapshot(
        &self,
        pool: &str,
        snapshot_id: &str,
        id: &str,
        name: &str,
    ) -> Result<VolumeInfo> {
        self.files
            .create_volume_from_snapshot(pool, snapshot_id, id, name)
            .map_err(relabel)
    }

    /// Creates (or completes, or finds) the target; `opts.loop_device` means
    /// nothing here. Exporting an exported target returns the same info.
    fn export(
        &self,
        pool: &str,
        target: &ExportTarget,
        opts: ExportOptions,
    ) -> Result<ConnectionInfo> {
        let (object, img) = self.image(pool, target)?;
        // The file driver checks the volume or snapshot exists, without
        // attaching anything (no loop device).
        let local = self
            .files
            .export(
                pool,
                target,
                ExportOptions {
                    loop_device: false,
                    read_only: opts.read_only,
                },
            )
            .map_err(relabel)?;
        let is_snapshot = matches!(target, ExportTarget::Snapshot(_));
        let read_only = local.read_only || is_snapshot;
        let iqn = target_iqn(&self.iqn_prefix, pool, target);
        self.check_portal(pool);
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let existing = self.find_target(pool, &object, &iqn, &img)?;
        let t = match existing {
            Some(t) => t,
            None => {
                let created = self.create_target(pool, &object, &iqn)?;
                let t = self
                    .find_target(pool, &object, &iqn, &img)?
                    .ok_or_else(|| {
                        DriverError::new(
                            DriverErrorKind::Io,
                            self.pool_label(pool),
                            &object,
                            format!("target {iqn} vanished right after it was created"),
                        )
                    })?;
                if created.is_some() {
                    debug!(%object, tid = t.tid, %iqn, "created iSCSI target");
                }
                t
            }
        };
        if let Err(e) = self.complete_target(pool, &object, &t, &img, read_only, is_snapshot) {
            // A target this call could not complete is removed again (when it
            // has no session: nobody can have logged in before the ACL).
            if t.nexuses.is_empty() && t.acl.is_empty() {
                if let Err(de) = self.delete_target(pool, &object, &t) {
                    warn!(%object, error = %de, "could not remove an incomplete target");
                }
            }
            return Err(e);
        }
        info!(
            backend = %self.backend, pool, %object, %iqn, tid = t.tid, read_only,
            "exported over iSCSI"
        );
        Ok(self.connection_info(iqn, read_only))
    }

    /// Deletes the target, ending its sessions. Works for a volume or
    /// snapshot that no longer exists.
    fn unexport(&self, pool: &str, target: &ExportTarget) -> Result<()> {
        let (object, img) = self.image(pool, target)?;
        let iqn = target_iqn(&self.iqn_prefix, pool, target);
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        match self.find_target(pool, &object, &iqn, &img)? {
            Some(t) => self.delete_target(pool, &object, &t),
            None => Ok(()),
        }
    }

    /// True while an initiator has a session on the volume's target (or a
    /// loop device is attached to its image).
    fn in_use(&self, pool: &str, id: &str) -> Result<bool> {
        let target = ExportTarget::Volume(id.to_string());
        let (object, img) = self.image(pool, &target)?;
        let iqn = target_iqn(&self.iqn_prefix, pool, &target);
        if let Some(t) = self.find_target(pool, &object, &iqn, &img)? {
            if !t.nexuses.is_empty() {
                return Ok(true);
            }
        }
        self.files.in_use(pool, id).map_err(relabel)
    }

    fn supports_change_tracking(&self, pool: &str) -> Result<bool> {
        self.files.supports_change_tracking(pool).map_err(relabel)
    }

    /// The file driver's FIEMAP comparison of two reflinked snapshots.
    fn changed_ranges(
        &self,
        pool: &str,
        from_snapshot: &str,
        to_snapshot: &str,
    ) -> Result<Option<Vec<ChangedRange>>> {
        self.files
            .changed_ranges(pool, from_snapshot, to_snapshot)
            .map_err(relabel)
    }
}
