//! The JSON sidecars next to each image file, written atomically.
//!
//! A sidecar is what makes an image file a volume or a snapshot: an image
//! without one is a leftover of an interrupted create (or delete), which the
//! engine removes by deleting the id again.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::Metadata;

/// `volume-<id>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VolumeRecord {
    pub id: String,
    pub name: String,
    pub size: u64,
    #[serde(default)]
    pub metadata: Metadata,
    /// Unix seconds.
    pub created: u64,
}

/// `snapshot-<id>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    pub id: String,
    pub volume_id: String,
    pub size: u64,
    /// Unix seconds.
    pub created: u64,
    /// Made by FICLONE (shares extents with its volume), which change
    /// tracking relies on. Absent (false) in sidecars written before it.
    #[serde(default)]
    pub reflinked: bool,
}

/// Writes `value` to `path` so that a crash leaves either the old content or
/// the new one, never a torn file: write a temporary file in the same
/// directory, fsync it, rename it over `path`, fsync the directory.
pub(super) fn write_atomic<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "sidecar path has no directory")
    })?;
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "sidecar path has no file name")
    })?;
    // Hidden and suffixed, so listing never mistakes it for a sidecar.
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads a sidecar; a file that does not parse is InvalidData.
pub(super) fn read<T: DeserializeOwned>(path: &Path) -> io::Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Makes a directory's entries (creations, renames, removals) durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(super) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
