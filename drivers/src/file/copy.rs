//! Point-in-time copies of image files: a reflink where the file system
//! shares extents (XFS, btrfs), else a copy of the data extents only, so
//! holes stay holes and a sparse volume's snapshot stays sparse.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use tracing::debug;

/// `FICLONE`: _IOW(0x94, 9, int).
pub(super) const FICLONE: libc::c_ulong = 0x4004_9409;

/// Buffer for the read/write fallback when copy_file_range is refused.
const COPY_BUF: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyMethod {
    Reflink,
    Sparse,
}

/// Makes `dst` (empty, open for writing) a copy of the first `size` bytes
/// of `src`, sized `size`.
pub(super) fn clone_file(src: &File, dst: &File, size: u64) -> io::Result<CopyMethod> {
    // SAFETY: FICLONE takes the source descriptor as its argument.
    if unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) } == 0 {
        // A reflink copies the whole source; the size is the source's, which
        // is `size` for our images, but make sure.
        dst.set_len(size)?;
        return Ok(CopyMethod::Reflink);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // Not a reflink-capable file system, or not between these two files.
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL | libc::ENOSYS) => {
            debug!(error = %e, "FICLONE unavailable, copying data extents");
        }
        _ => return Err(e),
    }
    sparse_copy(src, dst, size)?;
    Ok(CopyMethod::Sparse)
}

/// Copies the data extents of `src` (SEEK_DATA / SEEK_HOLE) into `dst`,
/// leaving holes unwritten.
fn sparse_copy(src: &File, dst: &File, size: u64) -> io::Result<()> {
    dst.set_len(size)?;
    let mut pos = 0;
    while pos < size {
        let Some(data) = seek(src, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= size {
            break;
        }
        let hole = seek(src, data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        copy_range(src, dst, data, hole - data)?;
        pos = hole;
    }
    Ok(())
}

/// lseek; None for ENXIO (no data at or after `pos`).
fn seek(f: &File, pos: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor we own.
    let r = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

/// Copies `len` bytes at `offset` (same offset in both files), in the
/// kernel when it can.
fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let mut off_in = pos as libc::loff_t;
        let mut off_out = pos as libc::loff_t;
        let want = (end - pos).min(1 << 30) as usize;
        // SAFETY: both descriptors are ours; the offsets are plain integers.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                    read_write(src, dst, pos, end)
                }
                _ => Err(e),
            };
        }
        if n == 0 {
            // The source is shorter than its extent map said (truncated
            // meanwhile): what is left reads as zeroes, i.e. stays a hole.
            break;
        }
        pos += n as u64;
    }
    Ok(())
}

fn read_write(src: &File, dst: &File, mut pos: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    while pos < end {
        let want = (end - pos).min(COPY_BUF as u64) as usize;
        let n = src.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            break;
        }
        dst.write_all_at(&buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::loopdev::test_support::{Mount, Scratch};

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let scratch = Scratch::new();
        let size = 16 << 20;
        let src_path = scratch.join("src");
        let src = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&src_path)
            .unwrap();
        src.set_len(size).unwrap();
        src.write_all_at(&[7u8; 8192], 1 << 20).unwrap();
        src.write_all_at(&[9u8; 4096], size - 4096).unwrap();
        src.sync_all().unwrap();
        let dst = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(scratch.join("dst"))
            .unwrap();
        sparse_copy(&src, &dst, size).unwrap();
        assert_eq!(dst.metadata().unwrap().len(), size);
        assert!(dst.metadata().unwrap().blocks() * 512 <= 256 * 1024);
        let mut a = vec![0u8; size as usize];
        let mut b = vec![0u8; size as usize];
        src.read_exact_at(&mut a, 0).unwrap();
        dst.read_exact_at(&mut b, 0).unwrap();
        assert!(a == b);
    }

    #[test]
    fn read_write_fallback_copies() {
        let scratch = Scratch::new();
        let src = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(scratch.join("s"))
            .unwrap();
        src.write_all_at(&[5u8; 3 * COPY_BUF + 17], 0).unwrap();
        let dst = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(scratch.join("d"))
            .unwrap();
        read_write(&src, &dst, 100, 3 * COPY_BUF as u64 + 17).unwrap();
        let mut b = vec![0u8; 3 * COPY_BUF + 17];
        dst.read_exact_at(&mut b, 0).unwrap();
        assert!(b[..100].iter().all(|&x| x == 0));
        assert!(b[100..].iter().all(|&x| x == 5));
    }

    /// FICLONE on a reflink-capable file system. Needs mkfs.xfs (xfsprogs,
    /// which fixtures/test.sh installs): a missing tool fails the test.
    #[test]
    fn reflink_on_xfs() {
        let Some(mkfs) = ["/usr/sbin/mkfs.xfs", "/sbin/mkfs.xfs"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            panic!("mkfs.xfs not installed: apt-get install xfsprogs (fixtures/test.sh does)");
        };
        let scratch = Scratch::new();
        let fs_img = scratch.join("xfs.img");
        File::create(&fs_img).unwrap().set_len(320 << 20).unwrap();
        let dev = crate::loopdev::LoopDevice::attach(&fs_img, false, false).unwrap();
        let out = std::process::Command::new(mkfs)
            .args(["-q", "-m", "reflink=1"])
            .arg(dev.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mkfs.xfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mnt = scratch.mkdir("mnt");
        let _mount = Mount::fs(dev.path(), &mnt, "xfs");

        let size = 64 << 20;
        let src = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(mnt.join("src"))
            .unwrap();
        src.set_len(size).unwrap();
        src.write_all_at(&[3u8; 1 << 20], 8 << 20).unwrap();
        let dst = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(mnt.join("dst"))
            .unwrap();
        assert_eq!(clone_file(&src, &dst, size).unwrap(), CopyMethod::Reflink);
        // The clone shares the source's blocks: changing one leaves the other.
        src.write_all_at(&[4u8; 4096], 8 << 20).unwrap();
        let mut b = vec![0u8; 1 << 20];
        dst.read_exact_at(&mut b, 8 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 3));
        assert_eq!(dst.metadata().unwrap().len(), size);
    }
}
