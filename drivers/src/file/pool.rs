//! Operations on one pool directory: file naming, id checks, sidecars,
//! copies, and errors labelled with the backend and pool.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::copy;
use super::sidecar::{self, SnapshotRecord, VolumeRecord};
use crate::loopdev;
use crate::{DriverError, DriverErrorKind, ExportTarget, Result, VolumeInfo};

/// One configured pool, resolved for an operation.
pub(crate) struct Pool<'a> {
    pub name: &'a str,
    pub dir: &'a Path,
    /// "file backend 'b' pool 'p'", the `backend` of every error.
    pub label: String,
}

impl Pool<'_> {
    pub fn volume_img(&self, id: &str) -> PathBuf {
        self.dir.join(format!("volume-{id}.img"))
    }

    pub fn volume_json(&self, id: &str) -> PathBuf {
        self.dir.join(format!("volume-{id}.json"))
    }

    pub fn snapshot_img(&self, id: &str) -> PathBuf {
        self.dir.join(format!("snapshot-{id}.img"))
    }

    pub fn snapshot_json(&self, id: &str) -> PathBuf {
        self.dir.join(format!("snapshot-{id}.json"))
    }

    pub fn err(
        &self,
        kind: DriverErrorKind,
        object: impl Into<String>,
        message: impl Into<String>,
    ) -> DriverError {
        DriverError::new(kind, &self.label, object, message)
    }

    /// An I/O error, classified by errno where it means something to the
    /// engine (a full pool, a busy device).
    pub fn io_err(
        &self,
        object: impl Into<String>,
        message: impl Into<String>,
        e: io::Error,
    ) -> DriverError {
        let kind = match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => Some(DriverErrorKind::NoSpace),
            Some(libc::EBUSY) => Some(DriverErrorKind::Busy),
            _ if e.kind() == io::ErrorKind::ResourceBusy => Some(DriverErrorKind::Busy),
            _ => None,
        };
        let mut err = DriverError::io(&self.label, object, message, e);
        if let Some(kind) = kind {
            err.kind = kind;
        }
        err
    }

    /// Ids become file names: refuse anything that could escape the pool
    /// directory or collide with our temporary files.
    pub fn check_id(&self, what: &str, id: &str) -> Result<()> {
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

    pub fn read_volume(&self, id: &str) -> Result<VolumeRecord> {
        let object = format!("volume {id}");
        let rec: VolumeRecord = match sidecar::read(&self.volume_json(id)) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.err(
                    DriverErrorKind::NotFound,
                    object,
                    format!("no volume '{id}' in pool '{}'", self.name),
                ))
            }
            Err(e) => return Err(self.io_err(object, "reading the volume's sidecar", e)),
        };
        if rec.id != id {
            return Err(self.err(
                DriverErrorKind::Io,
                object,
                format!(
                    "sidecar {} names volume '{}'",
                    self.volume_json(id).display(),
                    rec.id
                ),
            ));
        }
        if !self.volume_img(id).exists() {
            return Err(self.err(
                DriverErrorKind::NotFound,
                object,
                format!(
                    "volume '{id}' in pool '{}' has a sidecar but no image file",
                    self.name
                ),
            ));
        }
        Ok(rec)
    }

    pub fn read_snapshot(&self, id: &str) -> Result<SnapshotRecord> {
        let object = format!("snapshot {id}");
        let rec: SnapshotRecord = match sidecar::read(&self.snapshot_json(id)) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.err(
                    DriverErrorKind::NotFound,
                    object,
                    format!("no snapshot '{id}' in pool '{}'", self.name),
                ))
            }
            Err(e) => return Err(self.io_err(object, "reading the snapshot's sidecar", e)),
        };
        if rec.id != id || !self.snapshot_img(id).exists() {
            return Err(self.err(
                DriverErrorKind::NotFound,
                object,
                format!(
                    "snapshot '{id}' in pool '{}' is incomplete (sidecar and image do not match)",
                    self.name
                ),
            ));
        }
        Ok(rec)
    }

    pub fn volume_info(&self, rec: VolumeRecord) -> VolumeInfo {
        VolumeInfo {
            id: rec.id,
            name: rec.name,
            pool: self.name.to_string(),
            size: rec.size,
            metadata: rec.metadata,
        }
    }

    /// Loop devices attached to `img`; none if the file does not exist.
    pub fn attached(&self, object: &str, img: &Path) -> Result<Vec<PathBuf>> {
        match loopdev::find_attached(img) {
            Ok(v) => Ok(v),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(self.io_err(object, "looking for loop devices attached to it", e)),
        }
    }

    /// Refuses to go on while a loop device is attached to `img`.
    pub fn refuse_if_attached(&self, object: &str, img: &Path) -> Result<()> {
        let devs = self.attached(object, img)?;
        if devs.is_empty() {
            return Ok(());
        }
        Err(self.err(
            DriverErrorKind::Busy,
            object,
            format!(
                "attached to loop device(s) {}: unexport it first",
                join_paths(&devs)
            ),
        ))
    }

    /// Removes an image and its sidecar; missing files are fine.
    pub fn remove_pair(&self, object: &str, img: &Path, json: &Path) -> Result<()> {
        for path in [img, json] {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(self.io_err(object, format!("removing {}", path.display()), e))
                }
            }
        }
        sidecar::sync_dir(self.dir)
            .map_err(|e| self.io_err(object, "syncing the pool directory", e))
    }

    /// Creates `dst` as a copy of `src` (which must exist), sized `size`,
    /// and says how. On failure `dst` is removed again.
    pub fn copy_image(
        &self,
        object: &str,
        src: &Path,
        dst: &Path,
        size: u64,
    ) -> Result<copy::CopyMethod> {
        let src_file = File::open(src)
            .map_err(|e| self.io_err(object, format!("opening {}", src.display()), e))?;
        let dst_file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dst)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    self.err(
                        DriverErrorKind::AlreadyExists,
                        object,
                        format!("{} already exists", dst.display()),
                    )
                } else {
                    self.io_err(object, format!("creating {}", dst.display()), e)
                }
            })?;
        let result = copy::clone_file(&src_file, &dst_file, size).and_then(|method| {
            dst_file.sync_all()?;
            Ok(method)
        });
        match result {
            Ok(method) => {
                debug!(pool = %self.name, src = %src.display(), dst = %dst.display(), ?method, "copied image");
                Ok(method)
            }
            Err(e) => {
                drop(dst_file);
                if let Err(re) = std::fs::remove_file(dst) {
                    warn!(file = %dst.display(), error = %re, "could not remove a partial copy");
                }
                Err(self.io_err(
                    object,
                    format!("copying {} to {}", src.display(), dst.display()),
                    e,
                ))
            }
        }
    }

    /// Writes a sidecar; on failure removes `img`, whose create it completes.
    pub fn commit<T: serde::Serialize>(
        &self,
        object: &str,
        json: &Path,
        img: &Path,
        rec: &T,
    ) -> Result<()> {
        if let Err(e) = sidecar::write_atomic(json, rec) {
            if let Err(re) = std::fs::remove_file(img) {
                warn!(file = %img.display(), error = %re, "could not remove an image whose sidecar failed");
            }
            return Err(self.io_err(object, format!("writing {}", json.display()), e));
        }
        Ok(())
    }

    /// The image a target designates (which may not exist), and its name
    /// for errors.
    pub fn target_image(&self, target: &ExportTarget) -> Result<(String, PathBuf)> {
        match target {
            ExportTarget::Volume(id) => {
                self.check_id("volume", id)?;
                Ok((format!("volume {id}"), self.volume_img(id)))
            }
            ExportTarget::Snapshot(id) => {
                self.check_id("snapshot", id)?;
                Ok((format!("snapshot {id}"), self.snapshot_img(id)))
            }
        }
    }
}

pub(super) struct FsSpace {
    pub capacity: u64,
    /// Bytes an unprivileged user may still allocate (f_bavail).
    pub free: u64,
}

pub(super) fn statvfs(dir: &Path) -> io::Result<FsSpace> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs fills the struct we own from a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok(FsSpace {
        capacity: (st.f_blocks as u64).saturating_mul(frsize),
        free: (st.f_bavail as u64).saturating_mul(frsize),
    })
}

pub(super) fn join_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
