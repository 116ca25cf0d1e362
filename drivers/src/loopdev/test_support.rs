//! Guards shared by the tests of this crate: a scratch directory that
//! detaches loop devices left on its files, and a mount guard.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Panics unless running as root (loop devices and bind mounts need it).
pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests attach loop devices and must run as root"
    );
}

/// A mount, unmounted (lazily, so a lingering user cannot make it fail)
/// on drop.
pub struct Mount(PathBuf);

impl Mount {
    pub fn bind(src: &Path, target: &Path) -> Mount {
        Mount::new(src, target, None, libc::MS_BIND)
    }

    pub fn fs(dev: &Path, target: &Path, fstype: &str) -> Mount {
        Mount::new(dev, target, Some(fstype), 0)
    }

    fn new(src: &Path, target: &Path, fstype: Option<&str>, flags: libc::c_ulong) -> Mount {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("path without NUL");
        let (s, t) = (c(src), c(target));
        let fstype = fstype.map(|f| CString::new(f).expect("fs type without NUL"));
        let fsp = fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr());
        // SAFETY: valid C strings (or null where the call allows it).
        let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), fsp, flags, std::ptr::null()) };
        assert_eq!(
            r,
            0,
            "mount {} on {}: {}",
            src.display(),
            target.display(),
            std::io::Error::last_os_error()
        );
        Mount(target.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let Ok(t) = CString::new(self.0.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: valid C string.
        if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "warning: umount {}: {}",
                self.0.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

/// A temporary directory under /var/tmp. On drop, first detaches every
/// loop device backed by a file in it (so a failing test leaves none
/// behind), then removes it.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("volback-drivers-test-")
            .tempdir_in("/var/tmp")
            .expect("creating a scratch directory in /var/tmp");
        Scratch { dir }
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A subdirectory, created.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.join(name);
        std::fs::create_dir(&p).expect("mkdir in scratch");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut dirs = vec![self.dir.path().to_path_buf()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(ft) = entry.file_type() else { continue };
                if ft.is_dir() {
                    dirs.push(entry.path());
                } else if ft.is_file() {
                    for dev in super::find_attached(&entry.path()).unwrap_or_default() {
                        eprintln!(
                            "scratch cleanup: detaching {} ({})",
                            dev.display(),
                            entry.path().display()
                        );
                        if let Err(e) = super::detach_path(&dev) {
                            eprintln!("warning: could not detach {}: {e}", dev.display());
                        }
                    }
                }
            }
        }
    }
}
