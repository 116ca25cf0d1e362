//! Loop devices, driven through the loop-control ioctls (no `losetup`).
//!
//! [`LoopDevice::attach`] returns a guard that detaches the device when it
//! is dropped, so a failing operation never leaves a device behind; once the
//! attachment must outlive the caller (an export), [`LoopDevice::into_path`]
//! disarms the guard. Recovery after a crash goes the other way round:
//! [`find_attached`] finds every device backed by a file, by device and inode
//! number (never by path, which may have been renamed or replaced), and
//! [`detach_path`] detaches one.
//!
//! Devices are attached without LO_FLAGS_AUTOCLEAR: with it the kernel
//! would detach as soon as the last descriptor closes, i.e. right after
//! `attach` returns, and exports must stay attached.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use volback_connectors::loopinfo::{
    loop_status, LoopInfo64, LO_FLAGS_DIRECT_IO, LO_FLAGS_READ_ONLY, LO_NAME_SIZE,
};

use tracing::{debug, warn};

#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;

// ioctls and flags from <linux/loop.h>.
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

/// How often attach retries when another process grabs the free device
/// between LOOP_CTL_GET_FREE and LOOP_CONFIGURE.
const ATTACH_ATTEMPTS: u32 = 20;
/// How often LOOP_CLR_FD is retried on EBUSY (older kernels refuse while
/// another opener, typically udev's blkid probe, holds the device).
const DETACH_ATTEMPTS: u32 = 10;
/// How long detach waits for a deferred detach to complete. Since Linux 5.x
/// LOOP_CLR_FD only marks the device for clearing on last close when someone
/// else has it open (udev probing it, say); such holders go away in
/// milliseconds. A device still bound after this is held for real (mounted).
const DETACH_SETTLE: Duration = Duration::from_secs(5);

/// `struct loop_config`, the argument of LOOP_CONFIGURE (Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// What LOOP_GET_STATUS64 says about a bound loop device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopStatus {
    /// `st_dev` and `st_ino` of the backing file.
    pub backing_dev: u64,
    pub backing_ino: u64,
    pub read_only: bool,
    pub direct_io: bool,
}

/// An attached loop device, detached when dropped (unless released with
/// [`LoopDevice::into_path`] or detached explicitly with
/// [`LoopDevice::detach`]).
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    backing: PathBuf,
    /// Identity of the backing file, to make sure we detach the device we
    /// attached and not one someone re-attached at the same number.
    backing_dev: u64,
    backing_ino: u64,
    armed: bool,
}

impl LoopDevice {
    /// Attaches `file` to a free loop device. With `direct_io` the device
    /// reads and writes the file with O_DIRECT (no double caching); if the
    /// kernel refuses (the file system does not support it), the device is
    /// attached with buffered I/O instead.
    pub fn attach(file: &Path, read_only: bool, direct_io: bool) -> io::Result<LoopDevice> {
        let backing = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(file)
            .map_err(|e| {
                with_context(e, format!("opening loop backing file {}", file.display()))
            })?;
        let meta = backing.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("loop backing file {} is not a regular file", file.display()),
            ));
        }
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/loop-control")
            .map_err(|e| with_context(e, "opening /dev/loop-control".into()))?;

        let mut direct_io = direct_io;
        let mut last_busy = None;
        for attempt in 0..ATTACH_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(5 * u64::from(attempt)));
            }
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns an index.
            let index = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
            if index < 0 {
                return Err(with_context(
                    io::Error::last_os_error(),
                    "LOOP_CTL_GET_FREE".into(),
                ));
            }
            let path = PathBuf::from(format!("/dev/loop{index}"));
            // The loop device itself is always opened read-write: the
            // kernel makes the device read-only from LO_FLAGS_READ_ONLY (or
            // a read-only backing descriptor), not from this descriptor.
            let dev = match open_dev(&path, libc::O_RDWR) {
                Ok(d) => d,
                // Removed (LOOP_CTL_REMOVE) by someone else meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    last_busy = Some(e);
                    continue;
                }
                Err(e) => return Err(with_context(e, format!("opening {}", path.display()))),
            };
            match configure(&dev, &backing, file, read_only, direct_io) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Another process configured this device between our
                    // GET_FREE and CONFIGURE: ask for another one.
                    debug!(device = %path.display(), "loop device taken meanwhile, retrying");
                    last_busy = Some(e);
                    continue;
                }
                Err(e) if direct_io && e.raw_os_error() == Some(libc::EINVAL) => {
                    warn!(file = %file.display(), "loop device refused direct I/O, attaching with buffered I/O");
                    direct_io = false;
                    match configure(&dev, &backing, file, read_only, false) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                            last_busy = Some(e);
                            continue;
                        }
                        Err(e) => return Err(configure_error(e, &path, file)),
                    }
                }
                Err(e) => return Err(configure_error(e, &path, file)),
            }
            let guard = LoopDevice {
                path,
                backing: file.to_path_buf(),
                backing_dev: meta.dev(),
                backing_ino: meta.ino(),
                armed: true,
            };
            if direct_io {
                // Older kernels silently fall back to buffered I/O instead
                // of failing; say so, it matters for performance only.
                if let Ok(Some(st)) = status_of(&dev) {
                    if !st.direct_io {
                        debug!(device = %guard.path.display(), "kernel attached with buffered I/O");
                    }
                }
            }
            debug!(device = %guard.path.display(), file = %file.display(), read_only, direct_io, "attached loop device");
            return Ok(guard);
        }
        let e = last_busy.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY));
        Err(with_context(
            e,
            format!(
                "no free loop device for {} after {ATTACH_ATTEMPTS} attempts",
                file.display()
            ),
        ))
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The backing file, as given to [`LoopDevice::attach`].
    pub fn backing_file(&self) -> &Path {
        &self.backing
    }

    /// Detaches the device now, reporting failure (Drop can only log it).
    pub fn detach(mut self) -> io::Result<()> {
        self.armed = false;
        detach_checked(&self.path, Some((self.backing_dev, self.backing_ino)))
    }

    /// Disarms the guard: the device stays attached after this value is
    /// gone, and someone must detach it later ([`detach_path`]).
    pub fn into_path(mut self) -> PathBuf {
        self.armed = false;
        std::mem::take(&mut self.path)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(e) = detach_checked(&self.path, Some((self.backing_dev, self.backing_ino))) {
            warn!(device = %self.path.display(), file = %self.backing.display(), error = %e, "could not detach loop device");
        }
    }
}

/// Every loop device whose backing file is `file` (same device and inode).
pub fn find_attached(file: &Path) -> io::Result<Vec<PathBuf>> {
    let meta =
        std::fs::metadata(file).map_err(|e| with_context(e, format!("stat {}", file.display())))?;
    find_attached_inode(meta.dev(), meta.ino())
}

/// Every loop device whose backing file has this `st_dev` and `st_ino`.
pub fn find_attached_inode(dev: u64, ino: u64) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for path in bound_loop_devices()? {
        // A device may be detached (or vanish) between the listing and
        // the query: that is "not attached", not an error.
        match status(&path) {
            Ok(Some(st)) if st.backing_dev == dev && st.backing_ino == ino => found.push(path),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ENXIO | libc::ENODEV)
                ) => {}
            Err(e) => return Err(with_context(e, format!("querying {}", path.display()))),
        }
    }
    found.sort();
    Ok(found)
}

/// The status of a loop device, or None if it is not bound to a file.
pub fn status(dev: &Path) -> io::Result<Option<LoopStatus>> {
    let fd = open_dev(dev, libc::O_RDONLY)?;
    status_of(&fd)
}

/// Detaches the loop device at `dev`. Detaching a device that is not bound
/// is not an error.
pub fn detach_path(dev: &Path) -> io::Result<()> {
    detach_checked(dev, None)
}

/// Flushes a loop device's page cache down to its backing file, so a copy
/// of the file sees everything written to the device.
pub fn flush(dev: &Path) -> io::Result<()> {
    let fd = open_dev(dev, libc::O_RDONLY)?;
    // SAFETY: fsync on a descriptor we own.
    if unsafe { libc::fsync(fd.as_raw_fd()) } != 0 {
        return Err(with_context(
            io::Error::last_os_error(),
            format!("fsync {}", dev.display()),
        ));
    }
    Ok(())
}

/// LOOP_CLR_FD, then waits until the kernel has really let go of the file.
/// With `expect`, only detaches if the device is still backed by that
/// (dev, ino): after a crash or a concurrent detach, the same number may
/// have been reused for someone else's file.
fn detach_checked(dev: &Path, expect: Option<(u64, u64)>) -> io::Result<()> {
    let fd = match open_dev(dev, libc::O_RDONLY) {
        Ok(fd) => fd,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ENXIO | libc::ENODEV)
            ) =>
        {
            return Ok(())
        }
        Err(e) => return Err(with_context(e, format!("opening {}", dev.display()))),
    };
    let Some(before) = status_of(&fd)? else {
        debug!(device = %dev.display(), "loop device already detached");
        return Ok(());
    };
    let backing = (before.backing_dev, before.backing_ino);
    if let Some(want) = expect {
        if want != backing {
            warn!(device = %dev.display(), "loop device now backed by another file; not detaching it");
            return Ok(());
        }
    }
    let mut attempt = 0;
    loop {
        // SAFETY: LOOP_CLR_FD takes no argument.
        if unsafe { libc::ioctl(fd.as_raw_fd(), LOOP_CLR_FD as _, 0) } == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Not bound (any more): someone else detached it.
            Some(libc::ENXIO) => return Ok(()),
            Some(libc::EBUSY) if attempt + 1 < DETACH_ATTEMPTS => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(20 * u64::from(attempt)));
            }
            _ => return Err(with_context(e, format!("LOOP_CLR_FD on {}", dev.display()))),
        }
    }
    // Our own descriptor counts as an opener: close it before waiting.
    drop(fd);
    wait_detached(dev, backing)?;
    debug!(device = %dev.display(), "detached loop device");
    Ok(())
}

/// Waits until `dev` is no longer backed by `backing` (a deferred detach
/// completes when the last other opener closes the device).
fn wait_detached(dev: &Path, backing: (u64, u64)) -> io::Result<()> {
    let deadline = Instant::now() + DETACH_SETTLE;
    let mut pause = Duration::from_millis(1);
    loop {
        match status(dev) {
            Ok(Some(st)) if (st.backing_dev, st.backing_ino) == backing => {}
            Ok(_) => return Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ENXIO | libc::ENODEV)
                ) =>
            {
                return Ok(())
            }
            Err(e) => return Err(with_context(e, format!("querying {}", dev.display()))),
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "{} is still open by another process (mounted?); it will detach when that closes it",
                    dev.display()
                ),
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

fn configure(
    dev: &OwnedFd,
    backing: &File,
    file: &Path,
    read_only: bool,
    direct_io: bool,
) -> io::Result<()> {
    let mut info = LoopInfo64::zeroed();
    if read_only {
        info.lo_flags |= LO_FLAGS_READ_ONLY;
    }
    if direct_io {
        info.lo_flags |= LO_FLAGS_DIRECT_IO;
    }
    // Shown by `losetup -a` on kernels without sysfs backing_file; the
    // kernel wants it NUL-terminated, so at most LO_NAME_SIZE - 1 bytes.
    let name = file.as_os_str().as_bytes();
    let n = name.len().min(LO_NAME_SIZE - 1);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);
    let cfg = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        // 0: the kernel's default (512, or what direct I/O on the backing
        // file needs).
        block_size: 0,
        info,
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads a struct loop_config that outlives the call.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &cfg) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn configure_error(e: io::Error, dev: &Path, file: &Path) -> io::Error {
    with_context(
        e,
        format!("LOOP_CONFIGURE {} with {}", dev.display(), file.display()),
    )
}

fn status_of(fd: &OwnedFd) -> io::Result<Option<LoopStatus>> {
    Ok(loop_status(fd)?.map(|info| LoopStatus {
        backing_dev: info.lo_device,
        backing_ino: info.lo_inode,
        read_only: info.lo_flags & LO_FLAGS_READ_ONLY != 0,
        direct_io: info.lo_flags & LO_FLAGS_DIRECT_IO != 0,
    }))
}

/// Loop devices that are bound to a file: /sys/block/loopN/loop exists only
/// while loopN is bound, which spares opening every idle device.
fn bound_loop_devices() -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir("/sys/block") {
        Ok(e) => e,
        Err(e) => return Err(with_context(e, "listing /sys/block".into())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(num) = name.strip_prefix("loop") else {
            continue;
        };
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if entry.path().join("loop").is_dir() {
            out.push(PathBuf::from("/dev").join(name));
        }
    }
    Ok(out)
}

fn open_dev(path: &Path, flags: i32) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C string; the descriptor returned is ours.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Wraps an I/O error with what we were doing, keeping its kind (and so its
/// errno-based classification by callers: kind(), not raw_os_error()).
fn with_context(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}
