//! Volume drivers: the Rust counterpart of Cinder's volume drivers.
//!
//! A driver manages volumes and snapshots on one backend and exports them
//! as [`ConnectionInfo`] that a connector (in `volback-connectors`) turns
//! into an attached block device. The engine never touches storage except
//! through a driver and a connector.
//!
//! Identifiers are chosen by the caller, not the driver: the engine records
//! every resource in its catalog *before* asking a driver to create it, so
//! after a crash it can always find and remove it. Every delete and
//! unexport is idempotent for the same reason.

mod error;
pub mod fast_path;
pub mod file;
pub mod loopdev;
pub mod rbd;
pub mod tgt;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use error::{DriverError, DriverErrorKind};
pub use fast_path::{FastPath, TransferObserver, TransferReport, TransferRequest};

pub type Result<T> = std::result::Result<T, DriverError>;

/// Longest volume or snapshot id a driver accepts.
pub const MAX_ID_LEN: usize = 200;

/// Whether an id is acceptable: ids become file and image names, so only
/// 1 to [`MAX_ID_LEN`] of `[A-Za-z0-9._-]`, not starting with '.' (no path
/// escapes, no clash with hidden temporary files). UUIDs pass.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The error message for an id [`valid_id`] refuses.
pub fn invalid_id_message(what: &str) -> String {
    format!("invalid {what} id: use 1 to {MAX_ID_LEN} of [A-Za-z0-9._-], not starting with '.'")
}

/// Free-form key/value metadata a driver keeps with a volume.
pub type Metadata = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: String,
    pub name: String,
    pub pool: String,
    pub size: u64,
    pub metadata: Metadata,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub volume_id: String,
    pub pool: String,
    pub size: u64,
}

/// Says when two pools are the same storage, whatever they are called or
/// however they are reached (for the rule that a backup never lands in the
/// pool it protects). Opaque: compare for equality only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PoolIdentity(pub String);

impl std::fmt::Display for PoolIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub name: String,
    pub identity: PoolIdentity,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
}

/// What to export: a volume, or a snapshot (always read-only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExportTarget {
    Volume(String),
    Snapshot(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportOptions {
    /// Attach through a loop device rather than handing out the file.
    pub loop_device: bool,
    pub read_only: bool,
}

/// How to reach an exported volume: which connector and its properties
/// (like os-brick's connection_info). Properties never hold secrets in
/// clear; a secret is referenced (a key file path, a keyring name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// "local" (a file or block device path), "rbd" (an RBD image) or
    /// "iscsi" (portal, iqn and lun of a target, CHAP secrets by file path).
    pub connector: String,
    pub properties: BTreeMap<String, String>,
    pub read_only: bool,
}

/// A byte range of a volume: `len` bytes from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedRange {
    pub offset: u64,
    pub len: u64,
}

/// Sorts and merges ranges so they are disjoint and non-adjacent (the form
/// [`VolumeDriver::changed_ranges`] promises).
pub(crate) fn merge_ranges(mut ranges: Vec<ChangedRange>) -> Vec<ChangedRange> {
    ranges.retain(|r| r.len > 0);
    ranges.sort_by_key(|r| r.offset);
    let mut out: Vec<ChangedRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.offset <= last.offset + last.len => {
                let end = (last.offset + last.len).max(r.offset + r.len);
                last.len = end - last.offset;
            }
            _ => out.push(r),
        }
    }
    out
}

/// A volume driver. Pool names are the ones configured for the backend.
pub trait VolumeDriver: Send + Sync {
    /// The driver's kind, as written in the configuration ("file").
    fn kind(&self) -> &'static str;

    /// Pools this backend serves, with capacity and identity.
    fn pools(&self) -> Result<Vec<PoolInfo>>;

    fn pool_identity(&self, pool: &str) -> Result<PoolIdentity>;

    /// Creates an empty (reads as zero) volume with the caller's `id`.
    fn create_volume(
        &self,
        pool: &str,
        id: &str,
        name: &str,
        size: u64,
        metadata: &Metadata,
    ) -> Result<VolumeInfo>;

    /// Deletes a volume; deleting one that does not exist is not an error.
    fn delete_volume(&self, pool: &str, id: &str) -> Result<()>;

    fn get_volume(&self, pool: &str, id: &str) -> Result<VolumeInfo>;

    fn list_volumes(&self, pool: &str) -> Result<Vec<VolumeInfo>>;

    /// A point-in-time copy of a volume, with the caller's `snapshot_id`.
    fn create_snapshot(
        &self,
        pool: &str,
        volume_id: &str,
        snapshot_id: &str,
    ) -> Result<SnapshotInfo>;

    /// Whether this pool can take snapshots (restore points for
    /// incremental backups). A backend without them gets one full volume
    /// per backup.
    fn supports_snapshots(&self, _pool: &str) -> Result<bool> {
        Ok(true)
    }

    /// Deletes a snapshot; one that does not exist is not an error.
    fn delete_snapshot(&self, pool: &str, snapshot_id: &str) -> Result<()>;

    fn create_volume_from_snapshot(
        &self,
        pool: &str,
        snapshot_id: &str,
        id: &str,
        name: &str,
    ) -> Result<VolumeInfo>;

    /// Makes a volume or snapshot attachable and says how.
    fn export(
        &self,
        pool: &str,
        target: &ExportTarget,
        opts: ExportOptions,
    ) -> Result<ConnectionInfo>;

    /// Ends every export of the target; ending none is not an error.
    fn unexport(&self, pool: &str, target: &ExportTarget) -> Result<()>;

    /// Whether something outside volback's current operation uses the volume.
    fn in_use(&self, pool: &str, id: &str) -> Result<bool>;

    /// Whether [`VolumeDriver::changed_ranges`] can answer for snapshots
    /// made in `pool` from now on, so the engine knows up front whether
    /// keeping a backup's source snapshot will pay off.
    fn supports_change_tracking(&self, pool: &str) -> Result<bool> {
        let _ = pool;
        Ok(false)
    }

    /// Ranges of `to_snapshot` that may differ from `from_snapshot` (both
    /// snapshots of the same volume), from the backend's own change tracking;
    /// `None` when the backend cannot tell (the caller then compares data).
    /// Ranges outside the result are guaranteed equal in both snapshots.
    /// A snapshot size change is the caller's concern (it forces a full copy).
    ///
    /// The ranges are sorted, disjoint and non-adjacent.
    fn changed_ranges(
        &self,
        pool: &str,
        from_snapshot: &str,
        to_snapshot: &str,
    ) -> Result<Option<Vec<ChangedRange>>> {
        let _ = (pool, from_snapshot, to_snapshot);
        Ok(None)
    }

    /// This driver's vendor fast path for backups read from its volumes,
    /// if it has one (see [`fast_path`]). The engine tries it before the
    /// generic copy unless told `--generic`.
    fn fast_path(&self) -> Option<&dyn FastPath> {
        None
    }
}
